"""Memory of a merge: the byte budget that gates everything in flight, the pool that reuses read and output buffers,
and the malloc settings the merge runs under (scoped to the merge: see merge_allocator)."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch


class MemoryBudget:
    """Counts bytes in flight; a request larger than the whole budget waits until nothing else is held."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.high_water = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, cancelled: threading.Event) -> None:
        with self._cond:
            while self.in_use and self.in_use + n > self.limit:
                if cancelled.is_set():
                    raise Cancelled
                self._cond.wait(0.1)
            self.in_use += n
            self.high_water = max(self.high_water, self.in_use)

    def release(self, n: int) -> None:
        with self._cond:
            self.in_use -= n
            self._cond.notify_all()


class Cancelled(Exception):
    pass

MMAP_THRESHOLD = 4 << 20  # above any block temporary (2^18 float64 elements = 2 MiB), below budgeted chunks
TRIM_THRESHOLD = 32 << 20


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)
# What a process that merges is left with afterwards. glibc cannot report its settings, and once a threshold is set its
# dynamic adjustment is off for good, so these are the values that adjustment itself settles at in a process that
# has freed a buffer of 32 MiB or more (any training step of a real model frees many): the mmap threshold at its
# ceiling (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), the trim threshold twice that; and glibc's own arena limit, 8 per
# core. Without this a training run after a merge in the same process (a recipe's later batches, its evaluation)
# allocated every thread's memory from one arena with a 4 MiB threshold.
AFTER_MERGE = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - not glibc: no mallopt
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return None


@contextmanager
def merge_allocator(libc=None) -> Iterator[None]:
    """Within the block, glibc's malloc thresholds are fixed so block temporaries are recycled and budgeted buffers are
    returned at once; on the way out they are set back for whatever the process does next (AFTER_MERGE).

    By default glibc raises its mmap threshold after each large free, so later multi-megabyte buffers come from the heap
    and stay resident after they are freed: resident memory then creeps far past the budget. A fixed threshold stops
    that, but it must sit above the merge math's temporaries: at 1 MiB, with 2^18-element float32 blocks, every
    temporary (ties makes ~30 per block) was its own mmap, paid for with 256 page faults and an munmap: 40% of a ties
    merge's time (7.6 s of system time; 12.7 s -> 7.4 s wall at 4 MiB). The trim threshold keeps the heap from being
    shrunk and regrown between blocks. One arena for all threads: each extra arena (the statistics thread's, the read
    workers') kept its own free temporaries, 55 MB more peak RSS in a 64 MB-budget ties merge. Threads started inside
    the block (the merge's) share the main arena; those started after it get arenas of their own again.
    """
    libc = libc if libc is not None else _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # setting it also turns off the dynamic adjustment
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    libc.mallopt(M_ARENA_MAX, 1)
    try:
        yield
    finally:
        for param, value in AFTER_MERGE.items():
            libc.mallopt(param, value)
        libc.mallopt(M_ARENA_MAX, 8 * (os.cpu_count() or 1))  # glibc's default limit (NARENAS_FROM_NCORES)


class BufferPool:
    """Reuses read and output buffers: a fresh buffer costs a page fault and a zeroed page per 4 KiB (0.3 s of CPU per
    GB here).

    A request takes the smallest free buffer that is at least as large and at most 1/8 larger (the first `nbytes` of
    it): row chunks of different tensors differ by a few percent. When the pool is full the oldest buffers go, so sizes
    of tensors long finished do not crowd out the ones in use (with exact sizes and no eviction, 7% of the requests of
    a 3 x 10 GB merge were served). Buffers below the malloc mmap threshold are left to malloc, which reuses them.

    Free buffers may also fill the part of the in-flight budget that is not in use (`room`): they are evicted as soon
    as a fresh allocation needs that room, so held plus free bytes stay within the budget. With only its fixed share,
    the pool served 58% of the bytes of a 3 x 10 GB ties merge and the 34 GB of fresh buffers cost ~10 s of page faults.
    """

    SLACK = 8  # a buffer may be up to 1/SLACK larger than asked

    def __init__(self, cap: int, smallest: int = MMAP_THRESHOLD, room: Optional[Callable[[], int]] = None) -> None:
        self.cap = cap
        self.room = room
        self.smallest = smallest
        self.free_bytes = 0
        self._free: list[torch.Tensor] = []  # oldest first
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes >= self.smallest:
            with self._lock:
                fits = [(b.numel(), i) for i, b in enumerate(self._free) if nbytes <= b.numel() <= nbytes + nbytes // self.SLACK]
                if fits:
                    size, i = min(fits)
                    self.free_bytes -= size
                    return self._free.pop(i)[:nbytes]
                self._evict()  # the new buffer's bytes are already counted in flight: free what no longer fits
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            for b in buffers:
                if self.smallest <= b.numel() <= self.limit:
                    self._free.append(b)
                    self.free_bytes += b.numel()
            self._evict()

    @property
    def limit(self) -> int:
        return self.cap + (max(0, self.room()) if self.room else 0)

    def _evict(self) -> None:
        limit = self.limit
        while self.free_bytes > limit:
            self.free_bytes -= self._free.pop(0).numel()
