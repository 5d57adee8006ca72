"""Several processes training one model: how R-SFT shares a step between them, and the one operation it needs.

Every process holds the whole model and the same loop state (the epoch pool, each edit's known loss, the shuffled
order). In each step every process deals the step's examples out alike, by length, so each gets about the same number
of tokens (`positions`), and takes every size-th row of the retain mini-batch (sorted by length); the processes then
sum their gradients, so the update is the one a single process computes from the whole step (up to float rounding:
the sums run in another order). The per-example losses are gathered too, so every process updates its pool with every
loss and all of them take the same decisions and the same steps.

A process group is not wrapped around the model (as DDP does): the frozen-prefix cache, the retain KL and the
null-space projection run exactly as in one process, and the gradients are summed once per step, in one call.
The evaluation shares its batches the same way and gathers per-item results that are not numbers (`gather_json`).
"""

from __future__ import annotations

import json
from typing import Any, Optional, Protocol, Sequence

import torch


class Collective(Protocol):
    """The processes training together: this one's `rank` of `size`, and an in-place sum over all of them."""

    rank: int
    size: int

    def sum_(self, tensor: torch.Tensor) -> None:
        """Replace `tensor` (same shape and dtype on every process) by its sum over the processes."""


class ProcessGroup:
    """torch.distributed's default process group (set up by the launcher: accelerate launch, torchrun)."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.device = device  # NCCL sums device tensors; gloo CPU ones

    def sum_(self, tensor: torch.Tensor) -> None:
        if tensor.device == self.device:
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
            return
        moved = tensor.to(self.device)
        self._dist.all_reduce(moved, op=self._dist.ReduceOp.SUM)
        tensor.copy_(moved.to(tensor.device))


def positions(count: int, collective: Optional[Collective], sizes: Optional[Sequence[int]] = None) -> list[int]:
    """The positions (of `count` items) this process takes, in order; every process computes every share alike.

    Without `sizes`, every size-th item from the process's rank. With them (an item's cost, e.g. its tokens), the items
    are dealt largest first, each to the process with the least so far (ties: the lower rank), so the shares cost about
    the same: dealt by position instead, the chat form (longer) and raw form of each edit, which sit side by side,
    would all go to one process and the raw forms to the other. One process takes every position."""
    if collective is None or collective.size == 1:
        return list(range(count))
    if sizes is None:
        return list(range(collective.rank, count, collective.size))
    loads, owner = [0] * collective.size, [0] * count
    for j in sorted(range(count), key=lambda j: (-sizes[j], j)):
        r = min(range(collective.size), key=lambda r: (loads[r], r))
        owner[j] = r
        loads[r] += sizes[j]
    return [j for j in range(count) if owner[j] == collective.rank]


def spread(mine: Sequence[float], count: int, where: Sequence[int], dtype=torch.float64) -> torch.Tensor:
    """A zero vector of `count` items holding this process's values at its positions `where`: summed over the
    processes, it holds every item's value exactly (each is added to zeros only)."""
    full = torch.zeros(count, dtype=dtype)
    if where:
        full[torch.tensor(list(where), dtype=torch.long)] = torch.tensor(list(mine), dtype=dtype)
    return full


def gather(mine: Sequence[float], count: int, where: Sequence[int], collective: Optional[Collective]) -> list[float]:
    """The values of all `count` items, from each process's values at its positions `where`, in float64."""
    if collective is None or collective.size == 1:
        return list(mine)
    full = spread(mine, count, where)
    collective.sum_(full)
    return full.tolist()


def gather_json(mine: Any, collective: Optional[Collective]) -> list:
    """Every process's `mine` (a JSON value: lists, numbers, strings), in rank order. The sum carries the bytes: the
    lengths first, then a zero buffer in which each process writes its own slice, so the sum holds every slice
    unchanged. Used to gather per-item results that are not numbers (token ids of several lengths, answers)."""
    if collective is None or collective.size == 1:
        return [mine]
    data = json.dumps(mine, separators=(",", ":")).encode("ascii")  # ensure_ascii: one byte a character
    lengths = torch.zeros(collective.size, dtype=torch.int64)
    lengths[collective.rank] = len(data)
    collective.sum_(lengths)
    ends = lengths.cumsum(0).tolist()
    starts = [0] + ends[:-1]
    buffer = torch.zeros(ends[-1], dtype=torch.int32)  # int32: a sum every backend has (gloo and NCCL)
    buffer[starts[collective.rank] : ends[collective.rank]] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32)
    collective.sum_(buffer)
    raw = buffer.to(torch.uint8).numpy().tobytes()
    return [json.loads(raw[a:b]) for a, b in zip(starts, ends)]


def total(value: float, collective: Optional[Collective]) -> float:
    """`value` summed over the processes."""
    if collective is None or collective.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    collective.sum_(t)
    return float(t[0])


def sum_grads(params: Sequence[torch.Tensor], collective: Collective, extra: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Each parameter's gradient summed over the processes (a process whose share left a parameter without a gradient
    adds zeros; a parameter no process gave a gradient keeps None, as in one process), and `extra` (a vector, summed
    along, in the gradients' dtype) returned summed: one call per step, so the processes wait for each other once."""
    sample = next((p.grad for p in params if p.grad is not None), params[0] if params else extra)
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=sample.dtype, device=sample.device)
    extra = torch.zeros(0, dtype=sample.dtype, device=sample.device) if extra is None else extra.to(sample.device, sample.dtype)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p, dtype=sample.dtype)).reshape(-1) for p in params]
    flat = torch.cat([present, extra, *grads])
    collective.sum_(flat)
    offset = len(params) + extra.numel()
    for k, p in enumerate(params):
        n = p.numel()
        p.grad = None if float(flat[k]) == 0 else flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    return flat[len(params) : len(params) + extra.numel()].cpu()
