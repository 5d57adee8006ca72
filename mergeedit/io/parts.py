"""The folders of a partitioned merge: where each worker's shards and its done-record live, and how they are checked.

`mergeedit merge CONFIG OUT --part I/N` writes beside OUT, in `.OUT.mergeedit-parts/`:

    part-000I-of-000N/                  a finished part: its shards and mergeedit-part.json (digests and sizes)
    .part-000I-of-000N.work-<pid>-<id>/ a part being written (a resume journal inside); renamed when complete
    .part-000I-of-000N.mergeedit-lock   held while part I is written: a second worker for the same part refuses

Every worker writes only its own folder and takes only its own lock, so N workers never contend and a reader never
sees a partial part: a part's folder gets its final name only after every shard in it is fsynced and its record written.
`--assemble` hard-links the verified shards into OUT's temporary sibling and renames that into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..core.errors import MergeEditError
from ..core.json_shape import NON_NEGATIVE_INT, POSITIVE_INT, SHA256, MapOf, Obj, read_json
from ..core.paths import containment_problem, is_regular_file, kind_of
from .integrity import sha256_file
from .resume import read_journal

PARTS_MARK = ".mergeedit-parts"
RECORD = "mergeedit-part.json"
RECORD_SHAPE = Obj(required={
    "fingerprint": str,
    "part": POSITIVE_INT,
    "of": POSITIVE_INT,
    "shards": MapOf(Obj(required={"sha256": SHA256, "bytes": NON_NEGATIVE_INT})),
})
_PART_RE = re.compile(r"part-(\d{4,})-of-(\d{4,})")


def parts_folder(out_dir: Path) -> Path:
    """`.OUT.mergeedit-parts` beside OUT (on OUT's file system, so assembling is linking, not copying)."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}{PARTS_MARK}"


def part_name(part: int, of: int) -> str:
    return f"part-{part:04d}-of-{of:04d}"


def work_prefix(part: int, of: int) -> str:
    return f".{part_name(part, of)}.work-"


@dataclass
class PartRecord:
    """A finished part: which plan it belongs to (fingerprint) and each of its shards' sha256 and size."""

    folder: Path
    fingerprint: str
    part: int
    of: int
    shards: dict[str, dict]  # filename -> {"sha256", "bytes"}

    @property
    def label(self) -> str:
        return f"{self.part}/{self.of}"


def write_record(folder: Path, fingerprint: str, part: int, of: int, shards: dict[str, dict]) -> None:
    """The done-record, written last (fsynced, then renamed into its name) so its presence means every shard is on disk."""
    path = Path(folder) / RECORD
    tmp = path.with_name(RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint, "part": part, "of": of, "shards": shards}, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_record(folder: Path) -> Optional[PartRecord]:
    """A part folder's record, or None when it has none; one line when it is malformed or names files outside it."""
    folder = Path(folder)
    path = folder / RECORD
    if not os.path.lexists(path):
        return None
    data = read_json(path, RECORD_SHAPE, what="mergeedit part record", fix="rerun that part with --overwrite")
    for name in data["shards"]:
        if "/" in name or containment_problem(name, folder) is not None:
            raise MergeEditError(f"{path}: lists {name!r}, which is not a file of that folder; rerun that part with --overwrite")
    return PartRecord(folder, data["fingerprint"], data["part"], data["of"], dict(data["shards"]))


def finished_parts(out_dir: Path) -> list[PartRecord]:
    """Every finished part beside OUT (any plan, any N), in name order."""
    root = parts_folder(out_dir)
    if not root.is_dir():
        return []
    records = []
    for p in sorted(root.iterdir()):
        m = _PART_RE.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            record = read_record(p)
            if record is not None:
                records.append(record)
    return records


def shard_problem(record: PartRecord, filename: str, hash_file: bool = True) -> Optional[str]:
    """Why a part's shard is not what its record says (missing, not a file, wrong size, wrong sha256), or None."""
    path = record.folder / filename
    entry = record.shards[filename]
    if path.is_symlink() or not is_regular_file(path):
        return f"{path} is {'a symlink' if path.is_symlink() else kind_of(path)}"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path} has {size} bytes, its part record says {entry['bytes']} (truncated or replaced)"
    if hash_file and sha256_file(path) != entry["sha256"]:
        return f"{path}: sha256 does not match its part record (corrupt or modified)"
    return None


def check_shards(checks: list[tuple[PartRecord, str]]) -> list[Optional[str]]:
    """shard_problem for many shards at once: sha256 releases the GIL, so several files hash on several cores."""
    if not checks:
        return []
    workers = max(1, min(8, len(checks), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergeedit-verify") as pool:
        return list(pool.map(lambda c: shard_problem(*c), checks))


def verify_parts(out_dir: Path) -> list[tuple[PartRecord, int]]:
    """`mergeedit verify OUT` before --assemble: every finished part's shards against its record (first problem
    raised, naming the file and the part). Returns (record, files checked) per part."""
    records = finished_parts(out_dir)
    if not records:
        raise MergeEditError(f"{out_dir}: not a folder, and no finished parts in {parts_folder(out_dir)}; give a folder written by mergeedit merge/run")
    checks = [(r, name) for r in records for name in sorted(r.shards)]
    for (record, _), problem in zip(checks, check_shards(checks)):
        if problem is not None:
            raise MergeEditError(f"part {record.label}: {problem}; rerun it with --part {record.label} --resume")
    for record in records:
        extra = sorted(p.name for p in record.folder.iterdir() if p.name not in record.shards and p.name != RECORD)
        if extra:
            raise MergeEditError(f"part {record.label}: {record.folder / extra[0]} is not listed in its part record; it was added after mergeedit wrote the part")
    return [(r, len(r.shards)) for r in records]


def fingerprint_of_work(folder: Path) -> tuple[Optional[str], dict[str, str]]:
    """What an unfinished (or adopted) part folder claims: its journal's fingerprint and finished shards, else its
    record's (a part being redone after it was finished), else nothing."""
    journal = read_journal(folder)
    if journal is not None:
        return journal["fingerprint"], {str(k): str(v) for k, v in journal["shards"].items()}
    try:
        record = read_record(folder)
    except MergeEditError:
        return None, {}
    if record is None:
        return None, {}
    return record.fingerprint, {k: v["sha256"] for k, v in record.shards.items()}


def verified_shards(folder: Path, shard_names: list[str], claimed: dict[str, str]) -> dict[str, str]:
    """The claimed shards whose bytes still hash to their recorded sha256, in any order (a part's shards are
    independent files; a killed worker may have finished any of them)."""
    kept: dict[str, str] = {}
    for name in shard_names:
        digest = claimed.get(name)
        path = Path(folder) / name
        if digest is not None and not path.is_symlink() and is_regular_file(path) and sha256_file(path) == digest:
            kept[name] = digest
    return kept


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no bytes copied; the part keeps its file until the output is in place), or a copy where the file
    system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)

