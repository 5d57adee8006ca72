"""Proof that an output is whole: a sha256 manifest, its verification, a lock against concurrent writers, disk checks."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..core.errors import MergeEditError
from ..core.units import format_size

MANIFEST = "mergeedit-manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, known: dict[str, str]) -> None:
    """sha256 and size of every file in `folder`; `known` holds digests already computed while writing."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = f.relative_to(folder).as_posix()
        files[rel] = {"sha256": known.get(rel) or sha256_file(f), "bytes": f.stat().st_size}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")


def add_to_manifest(folder: Path, name: str) -> None:
    """Record one more file (written after the merge, like a model card) without re-hashing the others."""
    manifest = folder / MANIFEST
    data = json.loads(manifest.read_text()) if manifest.is_file() else {"files": {}}
    data["files"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.chmod(0o644)
    tmp.replace(manifest)


def verify_folder(folder: Path) -> int:
    """Check every file against the manifest; raise naming the first bad file. Returns the number of files checked."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise MergeEditError(f"{folder}: no {MANIFEST}; only folders written by mergeedit merge/run can be verified")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise MergeEditError(f"{manifest}: unreadable manifest; the folder cannot be verified") from None
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            raise MergeEditError(f"{path}: missing (listed in the manifest); the folder is incomplete")
        if path.stat().st_size != entry["bytes"]:
            raise MergeEditError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}; the file is truncated or was replaced")
        if sha256_file(path) != entry["sha256"]:
            raise MergeEditError(f"{path}: sha256 does not match the manifest; the file is corrupt or was modified")
    return len(files)


class OutputLock:
    """An exclusive lock beside OUT_DIR: a second run writing the same folder refuses instead of racing."""

    def __init__(self, final: Path) -> None:
        final = Path(final).absolute()
        self.path = final.parent / f".{final.name}.mergeedit-lock"
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            out = self.path.parent / self.path.name[1:].removesuffix(".mergeedit-lock")
            raise MergeEditError(f"{out}: cannot write in {self.path.parent} ({exc.strerror}); choose an output folder on a writable disk") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MergeEditError(f"{self.path.parent / self.path.name[1:].removesuffix('.mergeedit-lock')}: another mergeedit run (pid {holder}) is writing this folder; wait for it or choose another output") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def check_free_space(out_dir: Path, needed: int) -> None:
    probe = Path(out_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + (64 << 20):
        raise MergeEditError(f"{out_dir}: needs {format_size(needed)} of disk but {probe} has {format_size(free)} free; free space or choose another output folder")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
