"""Stream a merge plan to disk under a memory budget.

Three threads share the work: a reader prefetches the next chunk's inputs (pread releases the GIL; a chunk's inputs
are read at the same time by a few read workers), the caller's thread runs the merge method (torch uses every core but
one for the math), and a writer appends finished bytes to the shards. A byte budget gates everything in flight: a
chunk's read waits until its bytes fit, and the bytes are returned only after its output is on disk. Tensors too large for the budget are cut into row chunks; methods that
need whole-tensor statistics see every chunk in extra streaming passes first.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .errors import MergeEditError
from .io.shard_writer import ShardWriter
from .io.source_reader import read_input
from .io.tensor_reader import TensorReader
from .memory import peak_rss
from .methods.spec import MergeInputs, TensorStatistics
from .plan import MergePlan, PlannedTensor

DEFAULT_BLOCK = 1 << 18  # elements per block: big enough to amortise per-op overhead (2^16 and 2^17 measured no faster)

ProgressCallback = Callable[[PlannedTensor, int], None]  # (tensor finished, bytes written for it)


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
                    raise _Cancelled
                self._cond.wait(0.1)
            self.in_use += n
            self.high_water = max(self.high_water, self.in_use)

    def release(self, n: int) -> None:
        with self._cond:
            self.in_use -= n
            self._cond.notify_all()


class _Cancelled(Exception):
    pass


MMAP_THRESHOLD = 4 << 20  # above any block temporary (2^18 float64 elements = 2 MiB), below budgeted chunks
TRIM_THRESHOLD = 32 << 20


def tune_allocator() -> None:
    """Fix glibc's malloc thresholds so block temporaries are recycled and budgeted buffers are returned at once.

    By default glibc raises its mmap threshold after each large free, so later multi-megabyte buffers come from the heap
    and stay resident after they are freed: resident memory then creeps far past the budget. A fixed threshold stops
    that, but it must sit above the merge math's temporaries: at 1 MiB, with 2^18-element float32 blocks, every
    temporary (ties makes ~30 per block) was its own mmap, paid for with 256 page faults and an munmap: 40% of a ties
    merge's time (7.6 s of system time; 12.7 s -> 7.4 s wall at 4 MiB). The trim threshold keeps the heap from being
    shrunk and regrown between blocks.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; setting it also turns off the dynamic adjustment
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def math_threads() -> int:
    """Threads for the merge math: every core this process may use but one, left to the reader and writer threads.

    On 2 cores, two math threads made a ties merge no faster (12.5 s either way) for 55% more CPU: each parallel op
    waited for the half that was descheduled by a pread or a sha256 update.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class BufferPool:
    """Reuses read and output buffers: a fresh buffer costs a page fault and a zeroed page per 4 KiB (0.3 s of CPU per
    GB here).

    A request takes the smallest free buffer that is at least as large and at most 1/8 larger (the first `nbytes` of
    it): row chunks of different tensors differ by a few percent. When the pool is full the oldest buffers go, so sizes
    of tensors long finished do not crowd out the ones in use (with exact sizes and no eviction, 7% of the requests of
    a 3 x 10 GB merge were served). Buffers below the malloc mmap threshold are left to malloc, which reuses them.
    """

    SLACK = 8  # a buffer may be up to 1/SLACK larger than asked

    def __init__(self, cap: int, smallest: int = MMAP_THRESHOLD) -> None:
        self.cap = cap
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
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            for b in buffers:
                if self.smallest <= b.numel() <= self.cap:
                    self._free.append(b)
                    self.free_bytes += b.numel()
            while self.free_bytes > self.cap:
                self.free_bytes -= self._free.pop(0).numel()


@dataclass(frozen=True)
class _Job:
    tensor: int  # index into plan.tensors
    rows: Optional[tuple[int, int]]  # None = whole tensor
    nbytes: int  # budget charge
    reread: bool = False  # the same bytes are read again by a later pass: read them through the page cache


@dataclass
class _Schedule:
    tensor: int
    chunks: list[Optional[tuple[int, int]]]
    stat_passes: int
    charge: int  # budget bytes per chunk


@dataclass
class ExecutionReport:
    seconds: float
    bytes_read: int
    bytes_written: int
    peak_rss: int
    budget: int
    budget_high_water: int
    chunked_tensors: int
    resumed_shards: int = 0  # shards reused from a killed run (--resume), not recomputed


def _probe(t: PlannedTensor) -> MergeInputs:
    """MergeInputs carrying parameters but no data: enough for a method to say which statistics it needs."""
    return MergeInputs(t.name, [None] * len(t.sources), t.base, t.shared, t.per_input, 0, t.numel, t.seed, shape=tuple(t.shape))


def build_statistics(t: PlannedTensor) -> Optional[TensorStatistics]:
    return t.method.statistics(_probe(t)) if t.method.statistics else None


def schedule_tensor(index: int, t: PlannedTensor, budget: int) -> _Schedule:
    """Whole if its footprint fits a third of the budget (so read, merge and write can overlap), else row chunks."""
    stats = build_statistics(t)
    passes = stats.passes if stats else 0
    per_element = t.bytes_per_element_in_flight()
    whole = int(per_element * t.numel)
    target = max(1, budget // 3)
    if whole <= target or t.rows <= 1:
        return _Schedule(index, [None], passes, whole)
    row_elems = t.numel // t.rows
    rows_per_chunk = max(1, int(target // (per_element * row_elems)))
    chunks = [(a, min(a + rows_per_chunk, t.rows)) for a in range(0, t.rows, rows_per_chunk)]
    return _Schedule(index, chunks, passes, int(per_element * row_elems * rows_per_chunk))


def split_budget(budget: int) -> tuple[int, int]:
    """(bytes allowed in flight, bytes of free buffers kept for reuse): four fifths and one fifth."""
    return budget - budget // 5, budget // 5


def schedule_plan(plan: MergePlan, budget: int) -> list[_Schedule]:
    in_flight, _ = split_budget(budget)
    return [schedule_tensor(i, t, in_flight) for i, t in enumerate(plan.tensors)]


def _jobs(schedules: list[_Schedule]):
    """Every read in execution order: statistics passes over the chunks, then the merge pass."""
    for s in schedules:
        if len(s.chunks) == 1:
            yield _Job(s.tensor, s.chunks[0], s.charge)
            continue
        for _ in range(s.stat_passes + 1):
            for rows in s.chunks:
                yield _Job(s.tensor, rows, s.charge, reread=s.stat_passes > 0)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in `x`. A NaN or Inf anywhere makes the sum non-finite, and one vectorized sum costs ~40x less than
    isfinite().all(); only when the sum is not finite (which a huge but finite sum can also cause) look element-wise."""
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return math.isfinite(float(total)) or bool(torch.isfinite(x).all())


def merge_chunk(
    t: PlannedTensor, rows: Optional[tuple[int, int]], stored: list[torch.Tensor], stats: Any, out: torch.Tensor, block: int = DEFAULT_BLOCK
) -> Optional[MergeInputs]:
    """Merge the inputs of rows [a, b) of `t` (or all of it) into `out`, block by block. Returns the first block whose
    output holds NaN/Inf (the caller words the error), else None."""
    flat = out.view(-1)
    for start, inputs in input_blocks(t, rows, stored, block):
        inputs.stats = stats
        merged = t.method.merge(inputs)
        if merged.numel() != inputs.tensors[0].numel():
            raise RuntimeError(f"method {t.method.name} returned {merged.numel()} elements for a block of '{t.name}', expected {inputs.tensors[0].numel()}")
        if t.method.elementwise:
            written = flat[start : start + merged.numel()]
            written.copy_(merged.reshape(-1))
        else:
            written = out
            out.copy_(merged.reshape(out.shape))
        if t.out_dtype.is_floating_point and not all_finite(written):
            return inputs
    return None


def load_inputs(reader: TensorReader, t: PlannedTensor, rows: Optional[tuple[int, int]], alloc=None, readers: Optional[ThreadPoolExecutor] = None) -> list[torch.Tensor]:
    """The inputs of `t` for rows [a, b) (or whole), as its method must see them (adapters folded, vocabularies mapped).

    With `readers`, the inputs are read at the same time: direct reads from several files keep the disk busy where
    one synchronous read at a time left it idle between requests."""
    read = lambda src: read_input(reader, src.stored, src.row_map, rows, alloc=alloc)  # noqa: E731
    if readers is None or len(t.sources) < 2:
        return [read(src) for src in t.sources]
    return list(readers.map(read, t.sources))


def input_blocks(t: PlannedTensor, rows: Optional[tuple[int, int]], stored: list[torch.Tensor], block: int = DEFAULT_BLOCK):
    """(offset in the chunk, MergeInputs) for each cache-sized block of a chunk (the whole chunk for non-elementwise methods)."""
    row_elems = t.numel // t.rows if t.rows else 0
    chunk_offset = rows[0] * row_elems if rows else 0

    def cast(x: torch.Tensor) -> torch.Tensor:
        if t.load_dtype is not None:
            x = x.to(t.load_dtype)
        return x.to(t.compute_dtype)

    if not t.method.elementwise:
        yield 0, MergeInputs(t.name, [cast(x) for x in stored], t.base, t.shared, t.per_input, chunk_offset, t.numel, t.seed, shape=tuple(t.shape))
        return
    flat = [x.reshape(-1) for x in stored]
    n = flat[0].numel() if flat else 0
    for start in range(0, max(n, 1), block):
        end = min(start + block, n)
        yield start, MergeInputs(t.name, [cast(x[start:end]) for x in flat], t.base, t.shared, t.per_input, chunk_offset + start, t.numel, t.seed, shape=tuple(t.shape))


class Executor:
    def __init__(
        self,
        plan: MergePlan,
        writer: ShardWriter,
        budget: int,
        progress: Optional[ProgressCallback] = None,
        lookahead: int = 2,
        block: int = DEFAULT_BLOCK,
    ) -> None:
        self.plan = plan
        self.block = block
        self.writer = writer
        # Bytes in flight get most of the budget; buffers kept for reuse get the rest.
        self.budget_total = budget
        in_flight, pooled = split_budget(budget)
        self.budget = MemoryBudget(in_flight)
        self.pool = BufferPool(pooled)
        self.progress = progress
        self.lookahead = lookahead
        self._readers: Optional[ThreadPoolExecutor] = None  # concurrent reads of one job's inputs, during run()
        self.reader = TensorReader(direct=os.environ.get("MERGEEDIT_DIRECT_READS", "1") != "0")  # 0: always read through the page cache
        self._cancel = threading.Event()
        self._errors: list[BaseException] = []

    # -- threads ------------------------------------------------------------------------------------------------
    def _load(self, job: _Job) -> list[torch.Tensor]:
        self.reader.keep_in_cache = job.reread  # set by the reader thread only, before the reads it governs
        return load_inputs(self.reader, self.plan.tensors[job.tensor], job.rows, alloc=self.pool.take, readers=self._readers)

    @staticmethod
    def _raw(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole uint8 buffers behind tensors, to hand back to the pool (a direct read's tensor is an aligned
        window into a slightly larger buffer)."""
        return [torch.empty(0, dtype=torch.uint8).set_(x.untyped_storage()) if x.numel() else x for x in tensors]

    def _reader_loop(self, jobs, inbox: queue.Queue) -> None:
        try:
            for job in jobs:
                self.budget.acquire(job.nbytes, self._cancel)
                if self._cancel.is_set():
                    return
                inbox.put((job, self._load(job)))
        except _Cancelled:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._errors.append(exc)
            self._cancel.set()
        finally:
            inbox.put(None)

    def _writer_loop(self, outbox: queue.Queue) -> None:
        while True:
            item = outbox.get()
            if item is None:
                return
            name, tensor, charge, finished, buffers = item
            try:
                if not self._cancel.is_set():
                    self.writer.write(name, tensor)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self._errors.append(exc)
                self._cancel.set()
            finally:
                del tensor
                self.pool.give(buffers)
                self.budget.release(charge)
            if finished is not None and self.progress and not self._cancel.is_set():
                self.progress(*finished)

    # -- main ---------------------------------------------------------------------------------------------------
    def _next(self, inbox: queue.Queue):
        while True:
            try:
                item = inbox.get(timeout=0.1)
            except queue.Empty:
                if self._errors:
                    raise self._errors[0]
                continue
            if item is None:
                raise self._errors[0] if self._errors else RuntimeError("reader stopped early")
            return item

    def _blocks(self, t: PlannedTensor, job: _Job, stored: list[torch.Tensor]):
        return input_blocks(t, job.rows, stored, self.block)

    def _observe(self, t: PlannedTensor, stats: TensorStatistics, p: int, job: _Job, stored: list[torch.Tensor]) -> None:
        for _, block in self._blocks(t, job, stored):
            stats.observe(p, block)

    def run(self) -> ExecutionReport:
        threads = torch.get_num_threads()
        torch.set_num_threads(math_threads())
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)  # a recipe run trains in this process after merging

    def _run(self) -> ExecutionReport:
        tune_allocator()
        started = time.perf_counter()
        budget = self.budget_total
        schedules = schedule_plan(self.plan, budget)
        most_inputs = max((len(t.sources) for t in self.plan.tensors), default=1)
        self._readers = ThreadPoolExecutor(max_workers=min(8, most_inputs), thread_name_prefix="mergeedit-read") if most_inputs > 1 else None
        inbox: queue.Queue = queue.Queue(maxsize=self.lookahead)
        outbox: queue.Queue = queue.Queue(maxsize=self.lookahead)
        reader = threading.Thread(target=self._reader_loop, args=(_jobs(schedules), inbox), name="mergeedit-reader", daemon=True)
        writer = threading.Thread(target=self._writer_loop, args=(outbox,), name="mergeedit-writer", daemon=True)
        reader.start()
        writer.start()
        try:
            for s in schedules:
                self._run_tensor(s, inbox, outbox)
        except BaseException:
            self._cancel.set()
            raise
        finally:
            outbox.put(None)
            writer.join()
            self._cancel.set()
            while reader.is_alive():  # unblock a reader waiting on a full inbox
                try:
                    inbox.get(timeout=0.05)
                except queue.Empty:
                    pass
            if self._readers is not None:
                self._readers.shutdown(wait=True)
            self.reader.close()
        if self._errors:
            raise self._errors[0]
        self.writer.finish()
        return ExecutionReport(
            seconds=time.perf_counter() - started,
            bytes_read=self.reader.bytes_read,
            bytes_written=self.writer.bytes_written,
            peak_rss=peak_rss(),
            budget=budget,
            budget_high_water=self.budget.high_water,
            chunked_tensors=sum(len(s.chunks) > 1 for s in schedules),
        )

    def _run_tensor(self, s: _Schedule, inbox: queue.Queue, outbox: queue.Queue) -> None:
        t = self.plan.tensors[s.tensor]
        stats = build_statistics(t)
        if len(s.chunks) == 1:
            job, stored = self._next(inbox)
            if stats:
                for p in range(stats.passes):
                    self._observe(t, stats, p, job, stored)
                    stats.end_pass(p)
            self._emit(t, stats.result() if stats else None, job, stored, outbox, last=True)
            return
        if stats:
            for p in range(stats.passes):
                for _ in s.chunks:
                    job, stored = self._next(inbox)
                    self._observe(t, stats, p, job, stored)
                    self.pool.give(self._raw(stored))
                    del stored
                    self.budget.release(job.nbytes)
                stats.end_pass(p)
        result = stats.result() if stats else None
        for k in range(len(s.chunks)):
            job, stored = self._next(inbox)
            self._emit(t, result, job, stored, outbox, last=k == len(s.chunks) - 1)

    def _non_finite_error(self, t: PlannedTensor, block: MergeInputs) -> MergeEditError:
        """NaN/Inf in the output: blame the input checkpoint that holds them, else the output dtype's range."""
        for k, x in enumerate(block.tensors):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                model = self.plan.models[t.sources[k].model]
                return MergeEditError(
                    f"{model.ref}: tensor '{t.sources[k].info.name}' holds NaN/Inf values, so the merged '{t.name}' would too; "
                    "repair or replace that checkpoint"
                )
        return MergeEditError(
            f"'{t.name}': the {t.method.name} merge overflows {str(t.out_dtype).removeprefix('torch.')} (Inf/NaN in the output); "
            "choose a wider output dtype (--dtype bfloat16 or float32) or smaller weights"
        )

    def _emit(self, t: PlannedTensor, stats, job: _Job, stored: list[torch.Tensor], outbox: queue.Queue, last: bool) -> None:
        shape = ((job.rows[1] - job.rows[0],) + tuple(t.shape[1:])) if job.rows is not None else tuple(t.shape)
        out_bytes = math.prod(shape) * t.out_dtype.itemsize
        out = self.pool.take(out_bytes).view(t.out_dtype).view(shape) if out_bytes else torch.empty(shape, dtype=t.out_dtype)
        bad = merge_chunk(t, job.rows, stored, stats, out, self.block)
        if bad is not None:
            raise self._non_finite_error(t, bad)
        buffers = self._raw(stored) + self._raw([out])
        del stored
        outbox.put((t.name, out, job.nbytes, (t, t.bytes_out) if last else None, buffers))
