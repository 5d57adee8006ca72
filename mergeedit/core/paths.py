"""The one rule for paths that come out of files, and the one way data files are opened.

A path written inside a file (an index's weight_map, a manifest, an adapter or resume record) is data, not a command:
it must be relative, and after resolving symlinks it must land inside the folder the file belongs to (or the root that
folder lives in, such as a Hugging Face cache repo whose snapshot links into its blobs). Data is only ever read from
regular files, so a FIFO or a device where a shard should be is refused instead of blocking forever.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Optional

from .errors import MergeEditError

TMP_MARK = ".mergeedit-tmp-"  # a temporary sibling `.NAME.mergeedit-tmp-<pid>-<id>` that becomes NAME when complete


def shown_path(path: Path) -> Path:
    """`path` as the user knows it: a temporary sibling `.NAME.mergeedit-tmp-<pid>-<id>` in it is shown as NAME (where
    its content will be once complete), so messages never name a folder that is gone by the time they are read."""
    parts = []
    for part in Path(path).parts:
        if part.startswith(".") and TMP_MARK in part:
            part = part[1:].split(TMP_MARK, 1)[0] or part
        parts.append(part)
    return Path(*parts) if parts else Path(path)


def containment_problem(entry: object, folder: Path, root: Optional[Path] = None) -> Optional[str]:
    """Why `entry` (a path read from a file in `folder`) may not be used, or None when it stays inside.

    Lexically the entry must be a non-empty relative path without `..`, NUL or backslash parts; resolved (symlinks
    followed) it must lie inside `root` (default: `folder`)."""
    if not isinstance(entry, str) or not entry:
        return "a path must be a non-empty string"
    if "\0" in entry or "\\" in entry:
        return "a path may not hold NUL or backslash characters"
    pure = PurePosixPath(entry)
    if pure.is_absolute() or entry.startswith("~"):
        return "a path must be relative to the file's folder, not absolute"
    if any(part == ".." for part in pure.parts):
        return "a path may not climb out of the file's folder with '..'"
    if entry in (".", "./") or not pure.parts:
        return "a path must name a file"
    base = Path(root if root is not None else folder)
    try:
        resolved = (Path(folder) / entry).resolve()
        limit = base.resolve()
    except (OSError, RuntimeError):
        return "a path runs into a symlink loop"
    if resolved != limit and limit not in resolved.parents:
        return f"it resolves (through a symlink) to {resolved}, outside {limit}"
    return None


def contained_path(entry: object, folder: Path, *, source: Path, what: str, root: Optional[Path] = None) -> Path:
    """`folder / entry` when `entry` obeys the containment rule, else one line naming the file, the entry and the rule."""
    problem = containment_problem(entry, folder, root)
    if problem is not None:
        raise MergeEditError(f"{source}: {what} {entry!r} is refused: {problem}; only files inside {Path(root or folder)} are read")
    return Path(folder) / str(entry)


def is_regular_file(path: Path) -> bool:
    """True for a regular file (following symlinks); False for folders, FIFOs, devices, sockets and missing paths."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def kind_of(path: Path) -> str:
    """What is at `path`, in words, for messages."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        return "a dangling symlink" if os.path.islink(path) else "missing"
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def require_regular(path: Path, what: str = "file") -> Path:
    """`path` if it is a regular file, else one line saying what it is instead."""
    if not is_regular_file(path):
        raise MergeEditError(f"{path}: the {what} is {kind_of(path)}, not a regular file; point to a regular file")
    return path


def require_regular_if_present(folder: Path, names: tuple[str, ...], what: str = "model's") -> None:
    """Each of `names` that exists in `folder` is a regular file: before a library (transformers) opens them itself,
    where a FIFO would block the load forever and a device would feed it endless bytes."""
    for name in names:
        path = Path(folder) / name
        if os.path.lexists(path):
            require_regular(path, f"{what} {name}")


def open_regular(path: Path, what: str = "file") -> BinaryIO:
    """Open `path` for reading only if it is a regular file: opened non-blocking (a FIFO cannot hang the open), checked
    with fstat on the descriptor itself (no race with a swapped path), then switched back to blocking reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MergeEditError(f"{path}: the {what} is a symlink loop; fix the link") from None
        raise MergeEditError(f"{path}: cannot read the {what} ({exc.strerror}); check the path and its permissions") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise MergeEditError(f"{path}: the {what} is {kind_of(path)}, not a regular file; point to a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: Path, what: str = "file", limit: Optional[int] = None) -> bytes:
    """The bytes of a regular file (at most `limit`, else refused as too large)."""
    with open_regular(path, what) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise MergeEditError(f"{path}: the {what} is larger than {limit} bytes; it cannot be a {what}")
    return data
