"""Outputs appear whole or not at all: everything is written into a temporary sibling, then renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

from ..core.errors import MergeEditError

TMP_MARK = ".mergeedit-tmp-"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)
GENERATION_FILES = ("generation_config.json",)


def cache_root() -> Path:
    """Where mergeedit keeps what it converts once (built-in models, imported pickles): $MERGEEDIT_CACHE or ~/.cache/mergeedit."""
    return Path(os.environ.get("MERGEEDIT_CACHE") or Path.home() / ".cache" / "mergeedit").expanduser()


def check_output_location(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse outputs that would clobber something: an existing folder (without --overwrite) or an input's folder."""
    out = out.resolve()
    for src in inputs:
        src = src.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise MergeEditError(f"{out}: the output folder overlaps the input model folder {src}; choose a separate output folder")
    if out.exists() and not overwrite:
        raise MergeEditError(f"{out}: already exists; pass --overwrite to replace it or choose another folder")
    if out.exists() and not out.is_dir():
        raise MergeEditError(f"{out}: exists and is not a folder; remove it or choose another path")


class AtomicOutputDir:
    """Context manager yielding a temporary folder that replaces `final` only when the block completes."""

    def __init__(self, final: Path, adopt: Optional[Path] = None) -> None:
        self.final = Path(final).absolute()
        self.tmp = self.final.parent / f".{self.final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.adopt = adopt  # an abandoned temporary sibling to continue (--resume) instead of starting empty

    def __enter__(self) -> Path:
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
        trash = None
        if self.final.exists():
            trash = self.final.parent / f".{self.final.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}"
            os.rename(self.final, trash)
        os.rename(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def remove_stale_siblings(final: Path) -> None:
    """Delete temporary folders left next to `final` by runs that were killed (their process no longer exists)."""
    prefix = f".{final.name}{TMP_MARK}"
    if not final.parent.is_dir():
        return
    for p in final.parent.iterdir():
        if p.name.startswith(prefix) and is_abandoned(p, prefix):
            shutil.rmtree(p, ignore_errors=True)


def is_abandoned(p: Path, prefix: str) -> bool:
    """A temporary sibling whose writing process no longer exists."""
    pid = p.name[len(prefix):].split("-")[0]
    return not (pid.isdigit() and _alive(int(pid)))


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
