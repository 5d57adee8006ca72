"""Stream a merge plan to disk under a memory budget.

Four threads share the work: a reader prefetches the next chunk's inputs (pread releases the GIL; a chunk's inputs
are read at the same time by a few read workers), a statistics thread gathers the whole-tensor numbers a method needs
(TIES thresholds) for the next tensor while the caller's thread merges the current one (torch releases the GIL inside
each op, so the two use two cores), and a writer appends finished bytes to the shards. A byte budget gates everything in flight: a
chunk's read waits until its bytes fit, and the bytes are returned only after its output is on disk. Tensors too
large for the budget are cut into row chunks; methods that need whole-tensor statistics see every chunk in extra
streaming passes first. A statistic may learn that it needs fewer passes than scheduled (a sampled band settled the
threshold): the reads of the passes it no longer needs are skipped, or dropped unused if already made.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core.errors import MergeEditError
from ..core.memory import peak_rss, total_ram
from ..io.shard_writer import ShardWriter
from ..io.source_reader import read_stored
from ..io.tensor_reader import TensorReader
from .buffers import BufferPool, Cancelled, MemoryBudget, merge_allocator
from .chunks import DEFAULT_BLOCK, build_statistics, input_blocks, load_inputs, merge_chunk, probe_inputs, sample_inputs
from .methods import fused
from .methods.spec import MergeInputs, TensorStatistics
from .plan import MergePlan, PlannedTensor
from .schedule import Job, Schedule, read_jobs, schedule_plan, split_budget

KERNELS = ("auto", "fused", "eager")  # --kernels: whether methods may warm up faster kernels (methods.fused)
FUSE_MIN_ELEMENTS = 1 << 29  # auto: worth seconds of compiling only above this much work (~2 GB of float32 output)


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise MergeEditError(f"--kernels {kernels}: expected one of {', '.join(KERNELS)}")
    return kernels

ProgressCallback = Callable[[PlannedTensor, int], None]  # (tensor finished, bytes written for it)


def math_threads(with_statistics: bool = False) -> int:
    """Threads for each op of the merge math: every core this process may use but one, left to the reader and writer
    threads; half of those when a statistics thread runs ops at the same time (each calling thread gets its own team).

    On 2 cores, two math threads made a ties merge no faster (12.5 s either way) for 55% more CPU: each parallel op
    waited for the half that was descheduled by a pread or a sha256 update.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, (cores - 1) // 2 if with_statistics else cores - 1)


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
    fused_blocks: int = 0  # blocks computed by a compiled kernel (--kernels): merge formula, DARE norms
    kernel_failure: Optional[str] = None  # why compiled kernels are not in use, if compiling or running one failed


def _config_line(plan: MergePlan, ref: str) -> str:
    """`file:line (key)` of the first place in the merge config that names model `ref` (the config's one reference
    walker, MergeConfig.model_references), else the file."""
    for value, path in plan.config.model_references(tokenizers=False):
        if value == ref or ref.startswith(value + "+") or value.startswith(ref + "+"):
            return plan.doc.where(path)
    return str(plan.doc.path)


class Executor:
    def __init__(
        self,
        plan: MergePlan,
        writer: ShardWriter,
        budget: int,
        progress: Optional[ProgressCallback] = None,
        lookahead: int = 2,
        block: Optional[int] = None,
        kernels: str = "auto",
        direct_reads: bool = True,
    ) -> None:
        self.kernels = check_kernels(kernels)
        # the compiled kernels this merge's methods may use (methods.fused); --kernels eager: none, every block eager
        self.compiler: Optional[fused.KernelCompiler] = fused.KernelCompiler() if kernels != "eager" else None
        self.plan = plan
        self.block = block or DEFAULT_BLOCK  # read here, not at import: tests vary it (the bytes must not depend on it)
        self.writer = writer
        # Bytes in flight get most of the budget; buffers kept for reuse get the rest.
        self.budget_total = budget
        in_flight, pooled = split_budget(budget)
        self.budget = MemoryBudget(in_flight)
        self.pool = BufferPool(pooled, room=lambda: self.budget.limit - self.budget.in_use)
        self.progress = progress
        self.lookahead = lookahead
        self._readers: Optional[ThreadPoolExecutor] = None  # concurrent reads of one job's inputs, during run()
        self.reader = TensorReader(direct=direct_reads)  # False: always read through the page cache (MergeOptions)
        self._cancel = threading.Event()
        self._errors: list[BaseException] = []
        self._skipped: set[tuple[int, Optional[int]]] = set()  # (tensor, statistics pass) whose reads are not needed
        # inputs that could not stay cached anyway: re-read chunks leave the page cache after their last read (see
        # TensorReader.drop_after); smaller ones stay, as other reads would have left them, for the next merge
        self._inputs_exceed_cache = plan.bytes_in > total_ram() // 2

    # -- threads ------------------------------------------------------------------------------------------------
    def _load(self, job: Job) -> list[torch.Tensor]:
        drop = job.reread and job.stat_pass is None and self._inputs_exceed_cache  # the merge pass: the last read
        t = self.plan.tensors[job.tensor]
        return load_inputs(self.reader, t, job.rows, alloc=self.pool.take, readers=self._readers, keep_in_cache=job.reread, drop_after=drop)

    @staticmethod
    def _raw(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole uint8 buffers behind tensors, to hand back to the pool (a direct read's tensor is an aligned
        window into a slightly larger buffer)."""
        return [torch.empty(0, dtype=torch.uint8).set_(x.untyped_storage()) if x.numel() else x for x in tensors]

    def _reusable(self, job: Job, stored: list[torch.Tensor]) -> list[torch.Tensor]:
        """What of a job's inputs goes back to the pool: nothing for a re-read job, whose inputs are views of file
        mappings (TensorReader.keep_in_cache), freed (unmapped) with their last view."""
        return [] if job.reread else self._raw(stored)

    def _stage(self, work: Callable[[], None], out: queue.Queue) -> None:
        """Run one pipeline stage's work on its thread: an error goes to the main thread (and cancels the run); the end
        marker None follows, unless the run is cancelled and `out` stays full (nobody reads it any more)."""
        try:
            work()
        except Cancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._errors.append(exc)
            self._cancel.set()
        finally:
            try:
                self._put(out, None)
            except Cancelled:
                pass

    def _reader_loop(self, jobs, inbox: queue.Queue) -> None:
        def work() -> None:
            for job in jobs:
                self.budget.acquire(job.nbytes, self._cancel)
                if self._cancel.is_set():
                    return
                self._put(inbox, (job, self._load(job)))

        self._stage(work, inbox)

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
                    raise self._errors[0] from None
                if self._cancel.is_set():  # the main thread gave up: a stage waiting on its input stops too
                    raise Cancelled() from None
                continue
            if item is None:
                raise self._errors[0] if self._errors else RuntimeError("a pipeline stage stopped early")
            return item

    def _blocks(self, t: PlannedTensor, job: Job, stored: list[torch.Tensor]):
        return input_blocks(t, job.rows, stored, self.block, self.compiler)

    def _observe(self, t: PlannedTensor, stats: TensorStatistics, p: int, job: Job, stored: list[torch.Tensor]) -> None:
        for _, block in self._blocks(t, job, stored):
            stats.observe(p, block)

    def run(self) -> ExecutionReport:
        threads = torch.get_num_threads()
        torch.set_num_threads(math_threads(any(t.method.statistics for t in self.plan.tensors)))
        try:
            report = self._run()
            if self.compiler is not None:
                report.fused_blocks = self.compiler.blocks
                report.kernel_failure = self.compiler.failure
            return report
        finally:
            torch.set_num_threads(threads)  # a recipe run trains in this process after merging
            if self.compiler is not None:
                self.compiler.close()

    def _warm_up(self) -> None:
        """Let methods prepare faster kernels (compiled in the background) when the merge is big enough to repay it."""
        able = [t for t in self.plan.tensors if t.method.warm_up is not None]
        if self.compiler is None or not able:
            return
        if self.kernels == "auto" and sum(t.numel for t in able) < FUSE_MIN_ELEMENTS:
            return
        for t in able:
            t.method.warm_up(probe_inputs(t, self.compiler))

    def _run(self) -> ExecutionReport:
        with merge_allocator():
            return self._stream()

    def _stream(self) -> ExecutionReport:
        started = time.perf_counter()
        self._warm_up()
        budget = self.budget_total
        schedules = schedule_plan(self.plan, budget)
        most_inputs = max((len(t.sources) for t in self.plan.tensors), default=1)
        self._readers = ThreadPoolExecutor(max_workers=min(8, most_inputs), thread_name_prefix="mergeedit-read") if most_inputs > 1 else None
        inbox: queue.Queue = queue.Queue(maxsize=self.lookahead)
        outbox: queue.Queue = queue.Queue(maxsize=self.lookahead)
        ready: queue.Queue = queue.Queue(maxsize=1)  # merge-pass inputs with their statistics, one tensor ahead
        reader = threading.Thread(target=self._reader_loop, args=(read_jobs(schedules, self._skipped), inbox), name="mergeedit-reader", daemon=True)
        statistics = threading.Thread(target=self._statistics_loop, args=(schedules, inbox, ready), name="mergeedit-statistics", daemon=True)
        writer = threading.Thread(target=self._writer_loop, args=(outbox,), name="mergeedit-writer", daemon=True)
        for thread in (reader, statistics, writer):
            thread.start()
        try:
            for s in schedules:
                t = self.plan.tensors[s.tensor]
                for k in range(len(s.chunks)):
                    job, stored, result = self._next(ready)
                    self._emit(t, result, job, stored, outbox, last=k == len(s.chunks) - 1)
                    del stored
        except BaseException:
            self._cancel.set()
            raise
        finally:
            outbox.put(None)
            writer.join()
            self._cancel.set()
            for thread, q in ((statistics, ready), (reader, inbox)):  # unblock a thread waiting on a full queue
                while thread.is_alive():
                    try:
                        q.get(timeout=0.05)
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

    def _statistics_loop(self, schedules: list[Schedule], inbox: queue.Queue, ready: queue.Queue) -> None:
        def work() -> None:
            for s in schedules:
                for item in self._prepared(s, inbox):
                    self._put(ready, item)

        self._stage(work, ready)

    def _put(self, q: queue.Queue, item) -> None:
        """Put, waiting while `q` is full unless the run is cancelled (its reader may be gone)."""
        while True:
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._cancel.is_set():
                    raise Cancelled() from None

    def _prepared(self, s: Schedule, inbox: queue.Queue):
        """(job, inputs, statistics result) for each merge-pass chunk of one tensor, after its statistics passes.

        A statistic may learn that it needs fewer passes than scheduled (their reads are then skipped) or more (a
        sampled band that missed). A whole tensor is in memory, so any number of passes costs no read; a chunked
        one reads a pass the schedule did not foresee here, in row pieces small enough for the budget's margin."""
        t = self.plan.tensors[s.tensor]
        stats = build_statistics(t)
        whole = self._next(inbox) if len(s.chunks) == 1 else None
        if stats:
            prepare = getattr(stats, "prepare", None)
            p = 0
            while p < stats.passes:
                for c, (job, stored) in enumerate(self._pass_reads(t, s, p, inbox, whole)):
                    if prepare and p == 0 and c == 0:
                        prepare(sample_inputs(t, job.rows, stored))
                    self._observe(t, stats, p, job, stored)
                stats.end_pass(p)
                p += 1
                if whole is None:
                    self._skipped.update((s.tensor, q) for q in range(stats.passes, s.stat_passes))
        result = stats.result() if stats else None
        if whole is not None:
            yield *whole, result
            return
        for _ in s.chunks:
            yield *self._next_for(inbox, s.tensor), result

    def _pass_reads(self, t: PlannedTensor, s: Schedule, p: int, inbox: queue.Queue, whole):
        """(job, inputs) for statistics pass p: the whole tensor already in memory, the scheduled chunk reads (each
        dropped once observed), or, for a pass the schedule did not foresee, rows read here in pieces of about a
        tenth of the budget (the reader thread keeps prefetching within the rest)."""
        if whole is not None:
            yield whole
        elif p < s.stat_passes:
            for _ in s.chunks:
                job, stored = self._next_for(inbox, s.tensor)
                yield job, stored
                self._drop(job, stored)
        else:
            first, last = s.chunks[0][0], s.chunks[-1][1]
            rows = max(1, (s.chunks[0][1] - first) * (self.budget_total // 10) // max(1, s.charge))
            for a in range(first, last, rows):
                job = Job(s.tensor, (a, min(a + rows, last)), 0)
                yield job, load_inputs(self.reader, t, job.rows)

    def _next_for(self, inbox: queue.Queue, tensor: int):
        """The next read of `tensor` that is still needed: reads made for a pass since found unneeded are dropped."""
        while True:
            job, stored = self._next(inbox)
            if job.stat_pass is None or (tensor, job.stat_pass) not in self._skipped:
                return job, stored
            self._drop(job, stored)

    def _drop(self, job: Job, stored: list[torch.Tensor]) -> None:
        self.pool.give(self._reusable(job, stored))
        self.budget.release(job.nbytes)

    def _non_finite_error(self, t: PlannedTensor, block: MergeInputs) -> MergeEditError:
        """NaN/Inf in the output: blame the input checkpoint that holds them, else the output dtype's range."""
        for k, x in enumerate(block.tensors):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                source = t.sources[k]
                model = self.plan.models[source.model]
                line = _config_line(self.plan, model.ref)
                try:
                    stored = read_stored(self.reader, source.stored)
                    stored_finite = not stored.is_floating_point() or bool(torch.isfinite(stored).all())
                except Exception:  # noqa: BLE001 - only the wording depends on it
                    stored_finite = False
                if stored_finite and t.load_dtype is not None:
                    load_name = str(t.load_dtype).removeprefix("torch.")
                    return MergeEditError(
                        f"{self.plan.doc.where(('dtype',))}: dtype {load_name} cannot hold the values of '{source.info.name}' in "
                        f"{line} (stored as {source.info.dtype}, finite): converted, they become Inf; use dtype: float32 (or bfloat16)"
                    )
                return MergeEditError(
                    f"{line}: tensor '{source.info.name}' of {model.ref} holds NaN/Inf values, so the merged '{t.name}' would too; "
                    "repair or replace that checkpoint"
                )
        # The inputs are finite, so the parameters made it: say which, and whether a wider output dtype can help at all.
        values = {**block.shared, **{f"{k}[{i}]": v for i, p in enumerate(block.per_input) for k, v in p.items()}}
        numbers = ", ".join(f"{k}={v:g}" for k, v in values.items() if isinstance(v, float) and not isinstance(v, bool))
        try:
            finite_in_compute = bool(torch.isfinite(t.method.merge(block)).all())
        except Exception:  # noqa: BLE001 - only the advice depends on it
            finite_in_compute = True
        out_name, compute_name = str(t.out_dtype).removeprefix("torch."), str(t.compute_dtype).removeprefix("torch.")
        where = f"{self.plan.doc.path} ({numbers})" if numbers else str(self.plan.doc.path)
        if not finite_in_compute:
            return MergeEditError(
                f"'{t.name}': the {t.method.name} merge overflows even in its compute dtype {compute_name}, before any output "
                f"dtype applies: the parameters in {where} scale finite inputs past its range; use smaller weights (or lambda)"
            )
        lead = f"{self.plan.doc.where(('out_dtype',))}: " if ("out_dtype",) in self.plan.doc.lines else ""
        return MergeEditError(
            f"{lead}'{t.name}': the {t.method.name} merge overflows {out_name} (Inf/NaN in the output): the parameters in {where} "
            "produce values the output dtype cannot hold; choose a wider output dtype (--dtype bfloat16 or float32) or smaller weights"
        )

    def _emit(self, t: PlannedTensor, stats, job: Job, stored: list[torch.Tensor], outbox: queue.Queue, last: bool) -> None:
        shape = ((job.rows[1] - job.rows[0],) + tuple(t.shape[1:])) if job.rows is not None else tuple(t.shape)
        out_bytes = math.prod(shape) * t.out_dtype.itemsize
        out = self.pool.take(out_bytes).view(t.out_dtype).view(shape) if out_bytes else torch.empty(shape, dtype=t.out_dtype)
        bad = merge_chunk(t, job.rows, stored, stats, out, self.block, self.compiler)
        if bad is not None:
            raise self._non_finite_error(t, bad)
        buffers = self._reusable(job, stored) + self._raw([out])
        del stored
        outbox.put((t.name, out, job.nbytes, (t, t.bytes_out) if last else None, buffers))
