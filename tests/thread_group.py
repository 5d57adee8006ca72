"""Processes simulated by threads (editing/collective.py's `Collective`): no launcher, an in-memory sum."""

from __future__ import annotations

import threading

import torch


class ThreadGroup:
    """`size` members, each used by one thread: `sum_` waits for all of them and adds their tensors in rank order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: list = [None] * size

    def member(self, rank: int) -> "Member":
        return Member(self, rank)


class Member:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size

    def sum_(self, tensor: torch.Tensor) -> None:
        g = self.group
        g.slots[self.rank] = tensor.detach().clone()
        g.barrier.wait()
        out = g.slots[0].clone()
        for t in g.slots[1:]:
            out += t
        g.barrier.wait()  # every member has read the slots before any writes the next sum into them
        tensor.copy_(out)


def run_members(size: int, work) -> list:
    """`work(member)` in `size` threads; their results in rank order (an exception in any thread is raised here)."""
    group, results, errors = ThreadGroup(size), [None] * size, []

    def target(rank: int) -> None:
        try:
            results[rank] = work(group.member(rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
