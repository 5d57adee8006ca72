"""Outputs appear whole or not at all: everything is written into a temporary sibling, then renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

from ..core.errors import MergeEditError
from ..core.paths import TMP_MARK, kind_of

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)
GENERATION_FILES = ("generation_config.json",)
SIDE_FILES = ("config.json", *GENERATION_FILES, *TOKENIZER_FILES, "preprocessor_config.json")  # read by transformers itself


def check_output_location(out: Path, inputs: list[Path], overwrite: bool, protect: tuple[Path, ...] = ()) -> None:
    """Refuse outputs that would clobber something. Never an output: the current folder or a folder above it, an input
    model's folder (or one inside or above it), a folder holding `protect` (the config file). An existing folder is
    replaced only with --overwrite, and only when it is empty or mergeedit wrote it (its manifest lists exactly the
    files there, at their sizes); anything else is refused with the reason."""
    restore_interrupted_replacement(Path(out))
    out = Path(out).absolute()
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        what = "the current folder" if resolved == cwd else f"a folder above the current folder {cwd}"
        raise MergeEditError(f"{out}: the output folder is {what}; choose a new folder for the output")
    for src in inputs:
        src = Path(src).resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise MergeEditError(f"{out}: the output folder overlaps the input model folder {src}; choose a separate output folder")
    for keep in protect:
        keep = Path(keep).resolve()
        if resolved == keep or resolved in keep.parents:
            raise MergeEditError(f"{out}: the output folder holds {keep}, which the merge reads; choose a separate output folder")
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise MergeEditError(f"{out}: exists and is not a folder ({kind_of(out)}); remove it or choose another path")
    if not overwrite:
        raise MergeEditError(f"{out}: already exists; pass --overwrite to replace it or choose another folder")
    problem = replaceable_problem(out)
    if problem is not None:
        raise MergeEditError(
            f"{out}: --overwrite replaces only an empty folder or one mergeedit wrote, and {problem}; "
            "move or delete it yourself, or choose another folder"
        )


def replaceable_problem(folder: Path) -> Optional[str]:
    """Why `folder` is neither empty nor a mergeedit output whose manifest lists exactly its files; None if it is."""
    from .integrity import MANIFEST, manifest_problem

    try:
        if not any(folder.iterdir()):
            return None
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror})"
    if not os.path.lexists(folder / MANIFEST):
        return f"it holds no {MANIFEST}, so it is not a mergeedit output"
    problem = manifest_problem(folder, hash_files=False)
    return None if problem is None else f"it does not match its {MANIFEST}: {problem}"


class AtomicOutputDir:
    """Context manager yielding a temporary folder that replaces `final` only when the block completes.

    The old `final`, if any, stays in place until the new one takes its name: both are swapped in one atomic
    renameat2(RENAME_EXCHANGE) where the file system has it; elsewhere the old folder is renamed aside first, to a name
    no cleanup deletes (`.NAME.mergeedit-old-*`), and put back by the next run if the process dies in between."""

    def __init__(self, final: Path, adopt: Optional[Path] = None) -> None:
        self.final = Path(final).absolute()
        self.tmp = self.final.parent / f".{self.final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.adopt = adopt  # an abandoned temporary sibling to continue (--resume) instead of starting empty

    def __enter__(self) -> Path:
        restore_interrupted_replacement(self.final)
        if self.adopt is not None:
            os.rename(self.adopt, self.tmp)  # now owned by this (live) process, so the cleanup below spares it
        remove_stale_siblings(self.final)
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            if self.adopt is None:
                self.tmp.mkdir()
        except OSError as exc:
            raise MergeEditError(f"{self.final}: cannot create the output folder ({exc.strerror}); check that its parent is writable") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._commit()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _commit(self) -> None:
        for f in sorted(self.tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # files before their folders
            f.chmod(0o755 if f.is_dir() else 0o644)
            if not f.is_symlink():
                _fsync_dir(f)  # data of every file (and every folder's entries) on disk before the rename publishes them
        self.tmp.chmod(0o755)
        _fsync_dir(self.tmp)
        if os.path.lexists(self.final) and _exchange(self.tmp, self.final):
            _fsync_dir(self.final.parent)  # the new output is in place; self.tmp now holds the old one
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if os.path.lexists(self.final):
            old = self.final.parent / f".{self.final.name}{OLD_MARK}{uuid.uuid4().hex[:8]}"
            os.rename(self.final, old)
        os.rename(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


OLD_MARK = ".mergeedit-old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system or file system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def restore_interrupted_replacement(final: Path) -> None:
    """A run that died between renaming the previous output aside and renaming the new one in leaves `final` missing and
    the previous output at `.NAME.mergeedit-old-*`: put the newest such folder back under its name."""
    final = Path(final).absolute()
    if os.path.lexists(final) or not final.parent.is_dir():
        return
    prefixes = (f".{final.name}{OLD_MARK}", f".{final.name}{TMP_MARK}old-")  # the second: the name earlier versions gave it
    olds = [p for p in final.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink()]
    if olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
        os.rename(newest, final)


def remove_stale_siblings(final: Path) -> None:
    """Delete temporary folders left next to `final` by runs that were killed (their process no longer exists).

    Only `.NAME.mergeedit-tmp-<pid>-<id>` folders qualify, and only when no process `pid` lives: a previous output set
    aside during a replacement (`.NAME.mergeedit-old-*`) is never one of them."""
    prefix = f".{final.name}{TMP_MARK}"
    if not final.parent.is_dir():
        return
    for p in final.parent.iterdir():
        if p.name.startswith(prefix) and is_abandoned(p, prefix) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def is_abandoned(p: Path, prefix: str) -> bool:
    """A temporary sibling written by a process (its pid is in the name) that no longer exists."""
    pid, sep, rest = p.name[len(prefix):].partition("-")
    return pid.isdigit() and bool(sep) and bool(rest) and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    """fsync a file or a folder (opened read-only, which Linux allows for both)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_path = _fsync_dir  # the same, for other modules (partitioned merges publish their part folders with it)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_files(src_folder: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    copied = []
    for name in names:
        f = src_folder / name
        if f.is_file():
            shutil.copyfile(f, dst / name)
            copied.append(name)
    return copied
