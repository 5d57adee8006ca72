"""What a merge reads, in which order and in which pieces: each tensor whole when its footprint fits a third of the
in-flight budget, else in row chunks, with the statistics passes its method needs before the merge pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .chunks import build_statistics
from .plan import MergePlan, PlannedTensor


@dataclass(frozen=True)
class Job:
    tensor: int  # index into plan.tensors
    rows: Optional[tuple[int, int]]  # None = whole tensor
    nbytes: int  # budget charge
    reread: bool = False  # the same bytes are read again by a later pass: map them from the page cache
    stat_pass: Optional[int] = None  # the statistics pass this read serves; None for the merge pass


@dataclass
class Schedule:
    tensor: int
    chunks: list[Optional[tuple[int, int]]]
    stat_passes: int
    charge: int  # budget bytes per chunk


def schedule_tensor(index: int, t: PlannedTensor, budget: int) -> Schedule:
    """Whole if its footprint fits a third of the budget (so read, merge and write can overlap), else row chunks. A 1-D
    tensor is one row to a method that is not elementwise (a softmax row, a vector to rotate): it stays whole."""
    stats = build_statistics(t)
    passes = stats.passes if stats else 0
    per_element = t.bytes_per_element_in_flight()
    whole = int(per_element * t.numel)
    target = max(1, budget // 3)
    if whole <= target or t.rows <= 1 or (len(t.shape) == 1 and not t.method.elementwise):
        return Schedule(index, [None], passes, whole)
    row_elems = t.numel // t.rows
    rows_per_chunk = max(1, int(target // (per_element * row_elems)))
    chunks = [(a, min(a + rows_per_chunk, t.rows)) for a in range(0, t.rows, rows_per_chunk)]
    return Schedule(index, chunks, passes, int(per_element * row_elems * rows_per_chunk))


def split_budget(budget: int) -> tuple[int, int]:
    """(bytes allowed in flight, bytes of free buffers kept for reuse): four fifths and one fifth."""
    return budget - budget // 5, budget // 5


def schedule_plan(plan: MergePlan, budget: int) -> list[Schedule]:
    in_flight, _ = split_budget(budget)
    return [schedule_tensor(i, t, in_flight) for i, t in enumerate(plan.tensors)]


def read_jobs(schedules: list[Schedule], skipped: frozenset | set = frozenset()):
    """Every read in execution order: statistics passes over the chunks, then the merge pass. `skipped` holds
    (tensor, pass) pairs found unneeded while the reads run ahead; it is consulted as each read comes due."""
    for s in schedules:
        if len(s.chunks) == 1:
            yield Job(s.tensor, s.chunks[0], s.charge)
            continue
        for p in range(s.stat_passes + 1):
            stat_pass = p if p < s.stat_passes else None
            for rows in s.chunks:
                if (s.tensor, stat_pass) not in skipped:
                    yield Job(s.tensor, rows, s.charge, reread=s.stat_passes > 0, stat_pass=stat_pass)
