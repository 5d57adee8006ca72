"""`mergeedit merge`: config -> plan -> streamed shards + config + tokenizer, atomically in place."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from .executor import ExecutionReport, Executor, ProgressCallback, schedule_plan
from .io.output_dir import GENERATION_FILES, TOKENIZER_FILES, AtomicOutputDir, check_output_location, copy_files, write_json
from .errors import MergeEditError
from .io.integrity import OutputLock, check_free_space, is_disk_full, write_manifest
from .io.resume import Journal, find_resumable, fingerprint, verified_prefix
from .io.shard_writer import OutputEntry, Shard, ShardWriter, layout_shards
from .memory import default_budget
from .merge_config import load_merge_config
from .plan import MergePlan, build_plan

DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass
class MergeOptions:
    out_shard_size: int = DEFAULT_SHARD_SIZE
    memory_budget: int = field(default_factory=default_budget)
    random_seed: int = 0
    out_dtype: Optional[str] = None
    copy_tokenizer: bool = True
    overwrite: bool = False
    fsync: bool = True
    save_config: bool = True  # keep the merge config in the output as mergekit_config.yml
    resume: bool = False  # continue a killed run's temporary folder, reusing its checksum-verified shards


@dataclass
class PlanEstimate:
    """What --dry-run reports: work and resources, from headers alone."""

    tensors: int
    bytes_read: int
    bytes_written: int
    shards: int
    peak_in_flight: int
    chunks: list[int]  # per planned tensor: 1 = whole, more = row chunks

    @property
    def chunked_tensors(self) -> int:
        return sum(n > 1 for n in self.chunks)


def load_plan(config_path: Path, options: MergeOptions) -> MergePlan:
    config, doc = load_merge_config(config_path)
    return build_plan(config, doc, random_seed=options.random_seed, out_dtype=options.out_dtype)


def estimate(plan: MergePlan, options: MergeOptions) -> PlanEstimate:
    schedules = schedule_plan(plan, options.memory_budget)
    reads = sum(t.bytes_in * (1 + (s.stat_passes if len(s.chunks) > 1 else 0)) for t, s in zip(plan.tensors, schedules))
    # The reader runs at most two chunks ahead of the one merging, plus two waiting to be written.
    largest = sorted((s.charge for s in schedules), reverse=True)[:5]
    return PlanEstimate(
        tensors=len(plan.tensors),
        bytes_read=reads,
        bytes_written=plan.bytes_out,
        shards=len(layout_shards(output_entries(plan), options.out_shard_size)),
        peak_in_flight=max(min(sum(largest), options.memory_budget), largest[0] if largest else 0),
        chunks=[len(s.chunks) for s in schedules],
    )


def output_entries(plan: MergePlan) -> list[OutputEntry]:
    return [OutputEntry(t.name, t.out_dtype, t.shape) for t in plan.tensors]


def plan_fingerprint(plan: MergePlan, shards: list[Shard]) -> str:
    """What decides every output byte: tensors, their sources and parameters, seeds, dtypes, the shard layout."""
    tensors = [
        (t.name, t.shape, str(t.load_dtype), str(t.compute_dtype), str(t.out_dtype), t.method.name, t.shared, t.per_input, t.seed, t.base,
         [(plan.models[s.model].ref, s.info.name, s.info.start, s.info.end) for s in t.sources])
        for t in plan.tensors
    ]
    layout = [(s.filename, [e.name for e in s.entries]) for s in shards]
    inputs = {s.info.path for t in plan.tensors for s in t.sources if getattr(s.info, "path", None) is not None}
    return fingerprint([tensors, layout], inputs)


def write_merge(plan: MergePlan, out_dir: Path, options: MergeOptions, progress: Optional[ProgressCallback] = None) -> ExecutionReport:
    check_output_location(out_dir, [m.folder for m in plan.models], options.overwrite)
    shards = layout_shards(output_entries(plan), options.out_shard_size)
    check_free_space(out_dir, sum(s.nbytes for s in shards))
    try:
        with OutputLock(out_dir):
            key = plan_fingerprint(plan, shards)
            adopt, claimed = find_resumable(out_dir, key) if options.resume else (None, {})
            with AtomicOutputDir(out_dir, adopt=adopt) as tmp:
                done = verified_prefix(tmp, [s.filename for s in shards], claimed)
                journal = Journal(tmp, key, done)
                writer = ShardWriter(tmp, shards, fsync=options.fsync, done=done, on_shard_done=journal.record)
                finished = {e.name for s in shards if s.filename in done for e in s.entries}
                todo = replace(plan, tensors=[t for t in plan.tensors if t.name not in finished]) if finished else plan
                try:
                    report = Executor(todo, writer, options.memory_budget, progress).run()
                finally:
                    writer.abort()
                report.resumed_shards = len(done)
                journal.remove()
                if plan.out_config is not None:
                    write_json(tmp / "config.json", plan.out_config)
                config_folder = (plan.base_model or plan.models[0]).folder
                copy_files(config_folder, tmp, GENERATION_FILES)
                if options.copy_tokenizer and plan.tokenizer_model is not None:
                    copy_files(plan.tokenizer_model.folder, tmp, TOKENIZER_FILES)
                if options.save_config and plan.doc.path.is_file():
                    (tmp / "mergekit_config.yml").write_text(plan.doc.path.read_text())
                write_manifest(tmp, writer.digests)
    except OSError as exc:
        if is_disk_full(exc):
            raise MergeEditError(f"{out_dir}: the disk filled up while writing; the partial output was removed; free space or choose another folder") from None
        raise
    return report
