"""Proof that an output is whole: a sha256 manifest, its verification, a lock against concurrent writers, disk checks."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..core.errors import MergeEditError
from ..core.json_shape import MANIFEST as MANIFEST_SHAPE
from ..core.json_shape import read_json
from ..core.paths import containment_problem, is_regular_file, kind_of, open_regular, shown_path
from ..core.units import format_size

MANIFEST = "mergeedit-manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
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


def read_manifest(folder: Path) -> dict[str, dict]:
    """The manifest's files (relative path -> {sha256, bytes}), shape-checked: one line when it is missing or malformed."""
    manifest = Path(folder) / MANIFEST
    if not os.path.lexists(manifest):
        raise MergeEditError(f"{folder}: no {MANIFEST}; only folders written by mergeedit merge/run can be verified")
    return read_json(manifest, MANIFEST_SHAPE, what="mergeedit manifest", fix="the folder cannot be verified; rewrite it with mergeedit")["files"]


def add_to_manifest(folder: Path, name: str) -> None:
    """Record one more file (written after the merge, like a model card) without re-hashing the others."""
    manifest = folder / MANIFEST
    files = read_manifest(folder) if manifest.is_file() else {}
    files[name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=2) + "\n")
    tmp.chmod(0o644)
    tmp.replace(manifest)


def _present_files(folder: Path) -> list[str]:
    """Every entry under `folder` that is not a folder (files, symlinks, FIFOs...), as manifest-style relative paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):  # does not follow symlinked folders: those are reported
        base = Path(dirpath)
        for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
            rel = (base / name).relative_to(folder).as_posix()
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def manifest_problem(folder: Path, hash_files: bool = True) -> Optional[str]:
    """Why `folder` does not match its manifest (the first bad entry, in words), or None when every file it lists is
    there (a regular file inside the folder, of the listed size and, with `hash_files`, sha256) and nothing else is."""
    folder = Path(folder)
    try:
        files = read_manifest(folder)
    except MergeEditError as exc:
        return str(exc).removeprefix(f"{folder}: ")
    for rel, entry in files.items():
        problem = containment_problem(rel, folder)
        if problem is not None:
            return f"{folder / MANIFEST} lists {rel!r}, which is refused: {problem}"
        path = folder / rel
        if path.is_symlink() or not is_regular_file(path):
            return f"{path} (listed in the manifest) is {'a symlink' if path.is_symlink() else kind_of(path)}; the folder is incomplete"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path} has {size} bytes, the manifest says {entry['bytes']}; the file is truncated or was replaced"
    extra = [rel for rel in _present_files(folder) if rel not in files]
    if extra:
        return f"{folder / extra[0]} is not listed in the manifest ({len(extra)} such file{'s' if len(extra) > 1 else ''}); it was added after mergeedit wrote the folder"
    if hash_files:
        for rel, entry in files.items():
            if sha256_file(folder / rel) != entry["sha256"]:
                return f"{folder / rel}: sha256 does not match the manifest; the file is corrupt or was modified"
    return None


def verify_folder(folder: Path) -> int:
    """Check every file against the manifest (and that nothing else is there); raise naming the first bad file.
    Returns the number of files checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeEditError(f"{folder}: not a folder ({kind_of(folder)}); give a folder written by mergeedit merge/run")
    files = read_manifest(folder)
    problem = manifest_problem(folder)
    if problem is not None:
        raise MergeEditError(problem if problem.startswith(str(folder)) else f"{folder}: {problem}")
    return len(files)


class OutputLock:
    """An exclusive lock beside OUT_DIR: a second run writing the same folder refuses instead of racing."""

    def __init__(self, final: Path) -> None:
        final = Path(final).absolute()
        self.path = final.parent / f".{final.name}.mergeedit-lock"
        self._fd: int | None = None
        self._created: list[Path] = []  # folders made for the lock, removed again at exit when still empty

    def __enter__(self) -> "OutputLock":
        try:
            missing = [p for p in [self.path.parent, *self.path.parent.parents] if not os.path.lexists(p)]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._created = missing  # deepest first
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._remove_created()
            out = self.path.parent / self.path.name[1:].removesuffix(".mergeedit-lock")
            raise MergeEditError(f"{out}: cannot write in {self.path.parent} ({exc.strerror}); choose an output folder on a writable disk") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            self._remove_created()
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
        self._remove_created()

    def _remove_created(self) -> None:
        """Folders this lock created that nothing else filled (an early error leaves no empty parents behind)."""
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


def check_free_space(out_dir: Path, needed: int) -> None:
    probe = Path(out_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + FREE_SPACE_MARGIN:
        out_dir, probe = shown_path(out_dir), shown_path(probe)
        raise MergeEditError(
            f"{out_dir}: needs {format_size(needed)} of disk plus a {format_size(FREE_SPACE_MARGIN)} margin (config, tokenizer, "
            f"manifest, file system overhead) but {probe} has {format_size(free)} free; free space or choose another output folder"
        )


FREE_SPACE_MARGIN = 64 << 20


def is_disk_full(exc: BaseException) -> bool:
    """A full disk, a quota or a file size limit: as an OSError, or as the message of a library that words it itself
    (safetensors' writer: "I/O error: No space left on device (os error 28)")."""
    codes = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if isinstance(exc, OSError):
        return exc.errno in codes
    text = str(exc)
    return any(f"(os error {code})" in text for code in codes) or any(os.strerror(code) in text for code in codes)


@contextmanager
def write_errors_named(out_dir: Path, what: str = "output") -> Iterator[None]:
    """Every write path's OSError as one line: a full disk (or quota, or file size limit) says so, anything else names
    the error; the caller's atomic folder has already removed the partial output when this runs."""
    out_dir = shown_path(out_dir)
    try:
        yield
    except MergeEditError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise MergeEditError(f"{out_dir}: the disk filled up while writing the {what}; the partial output was removed; free space or choose another folder") from None
        if not isinstance(exc, OSError):
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise MergeEditError(f"{out_dir}: writing the {what} failed: {exc.strerror or exc}{where}; the partial output was removed; check the disk and its permissions") from None
