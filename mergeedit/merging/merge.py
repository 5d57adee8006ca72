"""`mergeedit merge`: config -> plan -> streamed shards + config + tokenizer, atomically in place."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from ..core.environment import FaultInjection, merge_switches
from ..core.memory import default_budget
from ..io.integrity import OutputLock, check_free_space, write_errors_named, write_manifest
from ..io.output_dir import GENERATION_FILES, TOKENIZER_FILES, AtomicOutputDir, check_output_location, copy_files, write_json
from ..io.resume import Journal, find_resumable, fingerprint, verified_prefix
from ..io.shard_writer import OutputEntry, Shard, ShardWriter, layout_shards, stage_size
from .chat_templates import write_chat_template
from .chunks import build_statistics
from .config import load_merge_config
from .executor import ExecutionReport, Executor, ProgressCallback
from .graph import every_merge, input_folders, is_merge_graph, plan_merge_graph
from .plan import MergePlan, build_plan
from .schedule import schedule_plan

DEFAULT_SHARD_SIZE = 5 * 10**9


def _flag(name: str) -> dict:
    return {"flag": name}


@dataclass
class MergeOptions:
    """Everything a merge is run with besides its config. Fields with a `flag` are `mergeedit merge` options (the CLI
    test checks the two match); the others are set by callers (recipe runs) or by the environment."""

    out_shard_size: int = field(default=DEFAULT_SHARD_SIZE, metadata=_flag("--out-shard-size"))
    memory_budget: int = field(default_factory=default_budget, metadata=_flag("--memory-budget"))
    random_seed: int = field(default=0, metadata=_flag("--random-seed"))
    out_dtype: Optional[str] = field(default=None, metadata=_flag("--dtype"))
    copy_tokenizer: bool = field(default=True, metadata=_flag("--copy-tokenizer"))
    overwrite: bool = field(default=False, metadata=_flag("--overwrite"))
    fsync: bool = True
    save_config: bool = True  # keep the merge config in the output as mergekit_config.yml
    allow_pickle: bool = field(default=False, metadata=_flag("--allow-pickle"))  # torch.load(weights_only=True), converted once
    resume: bool = field(default=False, metadata=_flag("--resume"))  # reuse a killed run's checksum-verified shards
    kernels: str = field(default="auto", metadata=_flag("--kernels"))  # fused | eager | auto (executor.KERNELS)
    # compute in float32 where mergekit computes in a config's bfloat16/float16 (README: Where we differ)
    float32_compute: bool = field(default=False, metadata=_flag("--float32-compute"))
    # read once from the environment (core.environment): MERGEEDIT_DIRECT_READS=0 / MERGEEDIT_DIRECT_WRITES=0 go
    # through the page cache (file systems without O_DIRECT); the tests' fault injection kills the merge at a point
    direct_reads: bool = field(default_factory=lambda: merge_switches()["direct_reads"])
    direct_writes: bool = field(default_factory=lambda: merge_switches()["direct_writes"])
    fault_injection: Optional[FaultInjection] = field(default_factory=lambda: merge_switches()["fault_injection"])

    @classmethod
    def cli_flags(cls) -> dict[str, str]:
        """field name -> the `mergeedit merge` flag that sets it."""
        return {f.name: f.metadata["flag"] for f in fields(cls) if "flag" in f.metadata}


@dataclass
class PlanEstimate:
    """What --dry-run reports: work and resources, from headers alone."""

    tensors: int
    bytes_read: int
    bytes_written: int
    shards: int
    peak_in_flight: int
    chunks: list[int]  # per planned tensor: 1 = whole, more = row chunks
    # the most working memory one tensor's statistics may hold outside the budget (mergekit's tie order, used only
    # where magnitudes tie at a top-k boundary: selection.TieOrder); 0 when no tensor can need it
    selection_bytes: int = 0

    @property
    def chunked_tensors(self) -> int:
        return sum(n > 1 for n in self.chunks)


def load_plan(config_path: Path, options: MergeOptions) -> MergePlan:
    if is_merge_graph(config_path):  # several named merges feeding each other (merge_graph.py)
        return plan_merge_graph(config_path, options)
    config, doc = load_merge_config(config_path)
    return build_plan(config, doc, random_seed=options.random_seed, out_dtype=options.out_dtype, allow_pickle=options.allow_pickle,
                      float32_compute=options.float32_compute)


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
        selection_bytes=max((getattr(build_statistics(t), "selection_bytes", 0) for t in plan.tensors), default=0),
    )


def output_entries(plan: MergePlan) -> list[OutputEntry]:
    return [OutputEntry(t.name, t.out_dtype, t.shape) for t in plan.tensors]


def _describe_sources(plan: MergePlan, t) -> list:
    out = []
    for s in t.sources:
        lora = (s.lora.a.path, s.lora.a.name, s.lora.b.name, s.lora.scale, s.lora.fan_in_fan_out) if s.lora is not None else None
        rows = hashlib.sha256(s.row_map.rows.numpy().tobytes() + repr(sorted(s.row_map.fills.items())).encode()).hexdigest() if s.row_map is not None else None
        out.append((plan.models[s.model].ref, s.info.name, s.info.start, s.info.end, lora, rows))
    return out


def plan_fingerprint(plan: MergePlan, shards: list[Shard]) -> str:
    """What decides every output byte: tensors, their sources (adapters, vocabulary maps) and parameters, seeds,
    dtypes, the shard layout, and the same for every upstream merge of a graph; plus the input files' identities."""
    plans = every_merge(plan)
    described = [
        [
            (t.name, t.shape, str(t.load_dtype), str(t.compute_dtype), str(t.out_dtype), t.method.name, t.shared, t.per_input, t.seed, t.base,
             _describe_sources(p, t))
            for t in p.tensors
        ]
        for p in plans
    ]
    layout = [(s.filename, [e.name for e in s.entries]) for s in shards]
    inputs = {s.info.path for p in plans for t in p.tensors for s in t.sources}
    inputs |= {s.lora.a.path for p in plans for t in p.tensors for s in t.sources if s.lora is not None}
    return fingerprint([described, layout], inputs)


def write_tokenizer(plan: MergePlan, folder: Path, copy_tokenizer: bool) -> None:
    """A merged tokenizer (tokenizer_source: union / a tokenizer: block) is saved; otherwise the source's files are
    copied (unless --no-copy-tokenizer); a configured chat_template is written last, as transformers 5 stores it."""
    if plan.output_tokenizer is not None:
        plan.output_tokenizer.save_pretrained(str(folder))
    elif copy_tokenizer and plan.tokenizer_model is not None:
        copy_files(plan.tokenizer_model.folder, folder, TOKENIZER_FILES)
    if plan.chat_template is not None:
        write_chat_template(folder, plan.chat_template)


def check_merge_location(plan: MergePlan, out_dir: Path, options: MergeOptions) -> None:
    """OUT must not clobber an input, the config, or (without --overwrite) an existing folder (check_output_location)."""
    config_files = [p.doc.path for p in every_merge(plan) if p.doc.path.is_file()]
    check_output_location(out_dir, input_folders(plan), options.overwrite, protect=tuple(config_files))


def write_model_files(plan: MergePlan, tmp: Path, options: MergeOptions, digests: dict[str, str]) -> None:
    """Everything of the output besides the shards and their index: config, generation config, tokenizer, the merge
    config, and last the manifest (`digests`: the shards' sha256, computed as they were written)."""
    if plan.out_config is not None:
        write_json(tmp / "config.json", plan.out_config)
    config_folder = (plan.base_model or plan.models[0]).folder
    copy_files(config_folder, tmp, GENERATION_FILES)
    write_tokenizer(plan, tmp, options.copy_tokenizer)
    if options.save_config and plan.doc.path.is_file():
        (tmp / "mergekit_config.yml").write_text(plan.doc.path.read_text())
    write_manifest(tmp, digests)


def write_merge(plan: MergePlan, out_dir: Path, options: MergeOptions, progress: Optional[ProgressCallback] = None) -> ExecutionReport:
    check_merge_location(plan, out_dir, options)
    shards = layout_shards(output_entries(plan), options.out_shard_size)
    check_free_space(out_dir, sum(s.nbytes for s in shards))
    with write_errors_named(out_dir, "merge"):
        with OutputLock(out_dir):
            key = plan_fingerprint(plan, shards)
            adopt, claimed = find_resumable(out_dir, key) if options.resume else (None, {})
            with AtomicOutputDir(out_dir, adopt=adopt) as tmp:
                done = verified_prefix(tmp, [s.filename for s in shards], claimed)
                journal = Journal(tmp, key, done)
                writer = ShardWriter(
                    tmp, shards, fsync=options.fsync, done=done, on_shard_done=journal.record,
                    direct=options.direct_writes, stage_bytes=stage_size(options.memory_budget), fault=options.fault_injection,
                )
                finished = {e.name for s in shards if s.filename in done for e in s.entries}
                todo = replace(plan, tensors=[t for t in plan.tensors if t.name not in finished]) if finished else plan
                try:
                    report = Executor(todo, writer, options.memory_budget, progress, kernels=options.kernels, direct_reads=options.direct_reads).run()
                finally:
                    writer.abort()
                report.resumed_shards = len(done)
                journal.remove()
                write_model_files(plan, tmp, options, writer.digests)
    return report
