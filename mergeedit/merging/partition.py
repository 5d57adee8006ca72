"""Partitioned merges: the output shards of one plan computed by N independent workers, then assembled.

The plan fixes every output shard (name, tensors, bytes) before a byte is read, so the shards can be dealt out to
workers up front: `assign_parts` gives each shard to the part with the fewest bytes so far, largest shards first (ties
to the lower shard and part number), which depends only on the shard layout and N. Parts are numbered 1..N (`--part
1/4` .. `--part 4/4`, as a SLURM job array `--array=1-4` numbers its tasks). A worker computes exactly the tensors of
its shards with the ordinary executor, into its own folder beside OUT (io.parts); `assemble` checks that every part is
there and that every shard's sha256 matches its part's record, links the shards into OUT's temporary sibling, writes
the index, config, tokenizer files and manifest, and renames it into place. Each tensor's bytes depend only on the plan
(never on which other tensors a process computes), so the result is byte-identical to a single-process merge.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ..core.errors import MergeEditError
from ..io.integrity import OutputLock, check_free_space, is_disk_full
from ..io.output_dir import AtomicOutputDir, fsync_path
from ..io.parts import (
    PartRecord,
    check_shards,
    fingerprint_of_work,
    finished_parts,
    link_or_copy,
    part_name,
    parts_folder,
    read_record,
    verified_shards,
    work_prefix,
    write_record,
)
from ..io.resume import Journal
from ..io.shard_writer import Shard, ShardWriter, layout_shards, stage_size, write_index
from .executor import ExecutionReport, Executor, ProgressCallback
from .merge import MergeOptions, check_merge_location, output_entries, plan_fingerprint, write_model_files
from .plan import MergePlan

_PART = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_part(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), parts numbered 1..N; one line naming the option otherwise."""
    m = _PART.fullmatch(text or "")
    if not m:
        raise MergeEditError(f"--part {text}: expected I/N, this worker's number and the number of workers (e.g. --part 2/4)")
    part, of = int(m.group(1)), int(m.group(2))
    check_part(part, of)
    return part, of


def check_part(part: int, of: int) -> None:
    if of < 1:
        raise MergeEditError(f"--part {part}/{of}: the number of workers must be at least 1")
    if not 1 <= part <= of:
        raise MergeEditError(f"--part {part}/{of}: parts are numbered 1 to {of} (1-based; a SLURM array runs --array=1-{of})")


def assign_parts(shards: list[Shard], of: int) -> list[list[int]]:
    """Shard indices per part (part 1 first), balanced by bytes: largest shard first, each to the part holding the
    fewest bytes so far (ties: lower shard index, lower part). Within a part, shards keep the plan's order."""
    loads = [0] * of
    parts: list[list[int]] = [[] for _ in range(of)]
    for i in sorted(range(len(shards)), key=lambda i: (-shards[i].nbytes, i)):
        k = min(range(of), key=lambda k: (loads[k], k))
        parts[k].append(i)
        loads[k] += shards[i].nbytes
    return [sorted(p) for p in parts]


@dataclass
class PartLayout:
    shards: list[Shard]  # every shard of the output
    mine: list[Shard]  # this part's
    fingerprint: str

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.mine)

    @property
    def tensors(self) -> int:
        return sum(len(s.entries) for s in self.mine)


def plan_part(plan: MergePlan, options: MergeOptions, part: int, of: int) -> PartLayout:
    check_part(part, of)
    shards = layout_shards(output_entries(plan), options.out_shard_size)
    mine = [shards[i] for i in assign_parts(shards, of)[part - 1]]
    return PartLayout(shards, mine, plan_fingerprint(plan, shards))


@dataclass
class PartReport:
    part: int
    of: int
    folder: Path
    shards: list[str]
    resumed_shards: int
    bytes_out: int
    seconds: float
    execution: Optional[ExecutionReport]  # None when nothing was left to compute


def _make_folder(folder: Path, out_dir: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MergeEditError(f"{out_dir}: cannot create {folder} for the parts ({exc.strerror}); check that the output's parent is writable") from None


def write_part(plan: MergePlan, out_dir: Path, options: MergeOptions, part: int, of: int, progress: Optional[ProgressCallback] = None) -> PartReport:
    """Compute part `part` of `of`: its shards, into `.OUT.mergeedit-parts/part-I-of-N` (written under a temporary
    name, renamed when every shard is fsynced and the done-record written). Only this part's lock is taken, so all
    parts can run at once. With options.resume, the verified shards of an earlier attempt at this part are kept."""
    started = time.perf_counter()
    check_merge_location(plan, out_dir, options)  # fail before computing when OUT is taken, or overlaps an input
    layout = plan_part(plan, options, part, of)
    root = parts_folder(out_dir)
    _make_folder(root, out_dir)
    final = root / part_name(part, of)
    try:
        check_free_space(root, layout.nbytes)
        with OutputLock(final):
            return _write_part_locked(plan, out_dir, options, part, of, layout, final, progress, started)
    except OSError as exc:
        if is_disk_full(exc):
            raise MergeEditError(f"{final}: the disk filled up while writing part {part}/{of}; free space, then rerun it with --resume") from None
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise MergeEditError(f"{final}: writing part {part}/{of} failed: {exc.strerror or exc}{where}; check the disk and its permissions") from None


def _write_part_locked(plan, out_dir, options, part, of, layout: PartLayout, final: Path, progress, started) -> PartReport:
    root = final.parent
    key = layout.fingerprint
    try:
        existing = read_record(final) if final.is_dir() else None
    except MergeEditError:
        existing = None  # a damaged record: the folder is replaced like any stale part
    if existing is not None and existing.fingerprint == key and not (options.resume or options.overwrite):
        raise MergeEditError(
            f"{final}: part {part}/{of} of this merge is already finished; run --assemble, or pass --resume to check it "
            "(and redo only what fails the check), or --overwrite to compute it again"
        )
    # The lock is held: every work folder of this part was left by a worker that is gone (on any node).
    leftovers = sorted((p for p in root.iterdir() if p.name.startswith(work_prefix(part, of)) and p.is_dir() and not p.is_symlink()),
                       key=lambda p: p.stat().st_mtime_ns, reverse=True)
    adopt, claimed = None, {}
    if options.resume:
        for candidate in ([final] if existing is not None else []) + leftovers:
            fp, shards = fingerprint_of_work(candidate)
            if fp == key:
                adopt, claimed = candidate, shards
                break
    work = root / f"{work_prefix(part, of)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if adopt is not None:
        os.rename(adopt, work)
    else:
        work.mkdir()
    for p in leftovers:
        if p != adopt:
            shutil.rmtree(p, ignore_errors=True)
    names = [s.filename for s in layout.mine]
    done = verified_shards(work, names, claimed) if adopt is not None else {}
    for f in work.iterdir():  # a half-written shard, a record or a journal of the earlier attempt
        if f.name not in done:
            shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
    journal = Journal(work, key, done)
    writer = ShardWriter(
        work, layout.mine, fsync=options.fsync, done=done, on_shard_done=journal.record,
        direct=options.direct_writes, stage_bytes=stage_size(options.memory_budget), index=False,
        fault=options.fault_injection,
    )
    finished = {e.name for s in layout.mine if s.filename in done for e in s.entries}
    wanted = {e.name for s in layout.mine for e in s.entries} - finished
    execution = None
    try:
        if wanted:
            todo = replace(plan, tensors=[t for t in plan.tensors if t.name in wanted])
            execution = Executor(todo, writer, options.memory_budget, progress, kernels=options.kernels, direct_reads=options.direct_reads).run()
        else:
            writer.finish()
    except BaseException:
        writer.abort()
        if not journal.done:  # nothing worth resuming
            shutil.rmtree(work, ignore_errors=True)
        raise
    journal.remove()
    write_record(work, key, part, of, {n: {"sha256": writer.digests[n], "bytes": (work / n).stat().st_size} for n in names})
    fsync_path(work)
    old = None
    if os.path.lexists(final):  # a stale part, or this part computed again (--overwrite): replaced only now
        old = root / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(work, final)
    fsync_path(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return PartReport(part, of, final, names, len(done), layout.nbytes, time.perf_counter() - started, execution)


@dataclass
class AssembleReport:
    of: int
    shards: int
    bytes_out: int
    seconds: float


def _choose_n(matching: list[PartRecord]) -> Optional[int]:
    """The N of the parts to assemble: one whose parts are all finished if any, else the one with most parts."""
    counts: dict[int, set[int]] = {}
    for r in matching:
        counts.setdefault(r.of, set()).add(r.part)
    if not counts:
        return None
    return max(counts, key=lambda n: (len(counts[n]) == n, len(counts[n]), -n))


def assemble(plan: MergePlan, out_dir: Path, options: MergeOptions) -> AssembleReport:
    """Check every part of the merge is finished and verified (sha256 of every shard against its part's record), then
    write OUT as a single-process merge would: shards (hard-linked from the parts), index, config, tokenizer, manifest,
    renamed into place at once. The parts are removed only after OUT is in place."""
    started = time.perf_counter()
    check_merge_location(plan, out_dir, options)
    shards = layout_shards(output_entries(plan), options.out_shard_size)
    key = plan_fingerprint(plan, shards)
    root = parts_folder(out_dir)
    config = plan.doc.path
    rerun = f"mergeedit merge {config} {out_dir} --part"
    with OutputLock(out_dir):
        records = finished_parts(out_dir)
        matching = [r for r in records if r.fingerprint == key]
        of = _choose_n(matching)
        if of is None:
            if records:
                raise MergeEditError(
                    f"{root}: its finished parts were computed for a different merge (the config, options or input files changed "
                    f"since); run every part again: {rerun} I/N for I = 1..N"
                )
            raise MergeEditError(f"{out_dir}: no finished parts in {root}; first run {rerun} I/N for every I = 1..N")
        by_part = {r.part: r for r in matching if r.of == of}
        assignment = assign_parts(shards, of)
        for i in range(1, of + 1):
            if i not in by_part:
                raise MergeEditError(f"part {i}/{of} is missing: {_why_missing(root, records, i, of)}; run {rerun} {i}/{of} (add --resume to keep what it finished)")
            expected = {shards[j].filename for j in assignment[i - 1]}
            if set(by_part[i].shards) != expected:
                raise MergeEditError(f"part {i}/{of}: {by_part[i].folder} holds other shards than the plan assigns it; run {rerun} {i}/{of} --overwrite")
        checks = [(by_part[i + 1], shards[j].filename) for i, idx in enumerate(assignment) for j in idx]
        for (record, _), problem in zip(checks, check_shards(checks)):
            if problem is not None:
                raise MergeEditError(f"part {record.label}: {problem}; run {rerun} {record.label} --resume (it keeps the shards that verify)")
        digests = {name: record.shards[name]["sha256"] for record, name in checks}
        try:
            with AtomicOutputDir(out_dir) as tmp:
                for record, name in checks:
                    link_or_copy(record.folder / name, tmp / name)
                write_index(tmp, shards)
                write_model_files(plan, tmp, options, digests)
        except OSError as exc:
            if is_disk_full(exc):
                raise MergeEditError(f"{out_dir}: the disk filled up while assembling; the parts are kept; free space and run --assemble again") from None
            raise MergeEditError(f"{out_dir}: assembling failed: {exc.strerror or exc}; the parts are kept; check the disk and run --assemble again") from None
    shutil.rmtree(root, ignore_errors=True)
    return AssembleReport(of, len(shards), sum(s.nbytes for s in shards), time.perf_counter() - started)


def _why_missing(root: Path, records: list[PartRecord], part: int, of: int) -> str:
    name = part_name(part, of)
    if any(r.part == part and r.of == of for r in records):
        return f"{root / name} was computed for a different merge (the config, options or input files changed since)"
    if any(p.name.startswith(work_prefix(part, of)) for p in root.iterdir()):
        return f"its worker did not finish (an unfinished {root}/{work_prefix(part, of)}* is there)"
    return f"no finished {root / name}"
