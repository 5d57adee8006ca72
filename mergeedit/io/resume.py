"""Resuming a killed merge: reuse the shards it finished, proven by checksum, and redo only the rest.

While a merge writes its temporary folder, a journal there records each shard the moment it is complete and fsynced
(its sha256 was computed as the bytes streamed out). A later run with `--resume` looks for a temporary sibling left by a
dead process whose journal carries the same fingerprint (same plan, options and input files), re-hashes the shards the
journal lists, keeps the verified prefix and writes the remaining shards. The result is byte-identical to an
uninterrupted run because shard layout, tensor order and every computed byte depend only on what the fingerprint covers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from ..core.errors import MergeEditError
from ..core.json_shape import JOURNAL as JOURNAL_SHAPE
from ..core.json_shape import read_json
from ..core.paths import containment_problem, is_regular_file
from .integrity import sha256_file
from .output_dir import TMP_MARK, is_abandoned

JOURNAL = ".mergeedit-progress.json"


def fingerprint(parts: Iterable[Any], inputs: Iterable[Path]) -> str:
    """sha256 of a JSON-able description of the work plus the identity (size, mtime) of every input file."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\n")
    for path in sorted({Path(p).resolve() for p in inputs}):
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class Journal:
    """The record of finished shards inside a temporary output folder, rewritten atomically after each shard."""

    def __init__(self, folder: Path, fingerprint: str, done: Optional[dict[str, str]] = None) -> None:
        self.path = Path(folder) / JOURNAL
        self.fingerprint = fingerprint
        self.done = dict(done or {})
        self._save()

    def record(self, filename: str, sha256: str) -> None:
        self.done[filename] = sha256
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"fingerprint": self.fingerprint, "shards": self.done}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def read_journal(folder: Path) -> Optional[dict]:
    """A temporary folder's journal, or None when it has none or one of the wrong shape (that folder is not resumed:
    a journal is only ever trusted for what it can prove, and its shard names must be plain files of that folder)."""
    path = Path(folder) / JOURNAL
    if not os.path.lexists(path):
        return None
    try:
        data = read_json(path, JOURNAL_SHAPE, what="resume journal", fix="it is ignored")
    except MergeEditError:
        return None
    if any(containment_problem(name, folder) or "/" in name for name in data["shards"]):
        return None
    return data


def find_resumable(final: Path, fingerprint: str) -> tuple[Optional[Path], dict[str, str]]:
    """The newest abandoned temporary sibling of `final` whose journal matches, and the shards it claims finished."""
    final = Path(final).absolute()
    prefix = f".{final.name}{TMP_MARK}"
    if not final.parent.is_dir():
        return None, {}
    candidates = [p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and is_abandoned(p, prefix)]
    for folder in sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        data = read_journal(folder)
        if data is not None and data.get("fingerprint") == fingerprint:
            return folder, {str(k): str(v) for k, v in data["shards"].items()}
    return None, {}


def verified_prefix(folder: Path, shard_names: list[str], claimed: dict[str, str]) -> dict[str, str]:
    """The leading shards whose bytes on disk still hash to what the journal recorded (the rest are redone)."""
    kept: dict[str, str] = {}
    for name in shard_names:
        digest = claimed.get(name)
        path = Path(folder) / name
        if digest is None or path.is_symlink() or not is_regular_file(path) or sha256_file(path) != digest:
            break
        kept[name] = digest
    return kept
