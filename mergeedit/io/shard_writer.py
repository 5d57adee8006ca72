"""Stream tensors into Hugging Face-style safetensors shards without holding a shard in memory.

The plan knows every output name, dtype and shape before any data exists, so each shard's header (and the index) is
fixed up front: a shard file is its header followed by tensor bytes appended in order as they are computed.

Shard bytes go to disk with O_DIRECT through a small aligned staging buffer (`DirectFile`): a buffered write here cost
~0.5 s of CPU per GB in the kernel's page-cache copy, and its dirty pages pushed out the input pages a chunked merge
reads twice; the staging copy costs ~0.1 s per GB. File systems that refuse O_DIRECT get buffered writes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.environment import FaultInjection
from .dtypes import TORCH_TO_SAFETENSORS, itemsize
from .model_source import INDEX_NAME, SINGLE_NAME
from .tensor_reader import DIRECT_ALIGN


@dataclass(frozen=True)
class OutputEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    filename: str
    entries: list[OutputEntry]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def header_bytes(self) -> bytes:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in self.entries:
            header[e.name] = {"dtype": TORCH_TO_SAFETENSORS[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data buffer to 8 bytes, as the reference writer does
        return len(raw).to_bytes(8, "little") + raw


def layout_shards(entries: list[OutputEntry], max_shard_bytes: int) -> list[Shard]:
    """Split entries in order into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    groups: list[list[OutputEntry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    if len(groups) == 1:
        return [Shard(SINGLE_NAME, groups[0])]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def write_index(folder: Path, shards: list[Shard]) -> None:
    """model.safetensors.index.json, only when there is more than one shard (as transformers does)."""
    if len(shards) < 2:
        return
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {e.name: s.filename for s in shards for e in s.entries},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


STAGE_BYTES = 32 << 20  # the largest O_DIRECT write: 4 MiB writes (one at a time) left a linear merge 20% slower


def stage_size(memory_budget: int) -> int:
    """The staging buffer for a memory budget: 1/32 of it, between 1 MiB and STAGE_BYTES, in whole pages."""
    size = min(STAGE_BYTES, max(1 << 20, memory_budget // 32))
    return size - size % DIRECT_ALIGN


class DirectFile:
    """A new file written sequentially: whole staging buffers with O_DIRECT, the unaligned tail buffered at close.

    With `direct` False, or where the file system refuses O_DIRECT (tmpfs; some refuse only at the first write), every
    byte is written buffered, as a plain file would be."""

    def __init__(self, path: Path, direct: bool = True, stage_bytes: Optional[int] = None) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o666)
                self.direct = True
            except OSError:
                pass
        if not self.direct:
            self.fd = os.open(path, flags, 0o666)
        self._size = stage_bytes or STAGE_BYTES
        self._map = mmap.mmap(-1, self._size) if self.direct else None  # anonymous: page aligned
        self._stage = memoryview(self._map) if self._map is not None else None
        self._fill = 0

    def write(self, view: memoryview) -> None:
        while view and self.direct:
            take = min(len(view), self._size - self._fill)
            self._stage[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == self._size:
                self._flush_stage()
        if view:  # buffered from the start, or since a refused direct write (which emptied the stage)
            _write_all(self.fd, view)

    def _flush_stage(self) -> None:
        try:
            _write_all(self.fd, self._stage[: self._fill])
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # O_DIRECT accepted at open but not for writing; anything else is real
                raise
            self._buffered()
            _write_all(self.fd, self._stage[: self._fill])
        self._fill = 0

    def _buffered(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self, fsync: bool) -> None:
        """Write the staged tail (buffered: its length is not aligned), optionally fsync, and close."""
        try:
            if self._fill:
                if self.direct:
                    self._buffered()
                _write_all(self.fd, self._stage[: self._fill])
            if fsync:
                os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._map is not None:
            stage, mapping = self._stage, self._map
            self._map = self._stage = None
            try:
                stage.release()
                mapping.close()
            except BufferError:
                # A failed write (a full disk) left slices of the stage alive in its traceback; the mapping is unmapped
                # when the last of them goes, so dropping our references is all that is left to do.
                pass


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        if n <= 0:  # a file system that takes no more bytes without saying why: treat it as full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


class ShardWriter:
    """Accepts tensor bytes in plan order (whole tensors or consecutive row chunks) and appends them to shard files.

    Every planned tensor must be written, zero-size ones included (with an empty tensor).
    """

    def __init__(
        self,
        folder: Path,
        shards: list[Shard],
        fsync: bool = True,
        done: Optional[dict[str, str]] = None,
        on_shard_done: Optional[Callable[[str, str], None]] = None,
        direct: bool = True,
        stage_bytes: Optional[int] = None,
        index: bool = True,
        fault: Optional[FaultInjection] = None,
    ) -> None:
        """`done`: shards already complete on disk (filename -> sha256, from a resumed run); they are not rewritten and
        their tensors must not be sent. `on_shard_done(filename, sha256)` runs once a shard is fsynced and closed.
        `direct`: write shard bytes with O_DIRECT where the file system allows, `stage_bytes` at a time (DirectFile).
        `index`: write the index at finish (False for one part of a partitioned merge: --assemble writes it).
        `fault`: the tests' fault injection (core.environment): the process signals itself after that many tensors."""
        self.folder = Path(folder)
        self.shards = shards
        self.fsync = fsync
        self.direct = direct
        self.stage_bytes = stage_bytes
        self.on_shard_done = on_shard_done
        self.index = index
        self._order = [(si, e) for si, s in enumerate(shards) if s.filename not in (done or {}) for e in s.entries]
        self.fault = fault
        self._tensors_written = 0
        self._pos = 0  # index into _order of the tensor being written
        self._written_in_tensor = 0
        self._file = None
        self._shard_index = -1
        self._hash = None
        self.digests: dict[str, str] = dict(done or {})  # sha256 of each finished shard, computed as its bytes stream out
        self.bytes_written = 0

    def _open_shard(self, si: int) -> None:
        self._close_file()
        self._shard_index = si
        self._file = DirectFile(self.folder / self.shards[si].filename, self.direct, self.stage_bytes)
        self._hash = hashlib.sha256()
        header = self.shards[si].header_bytes()
        self._file.write(memoryview(header))
        self._hash.update(header)
        self.bytes_written += len(header)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close(self.fsync)
            self._file = None
            filename = self.shards[self._shard_index].filename
            self.digests[filename] = self._hash.hexdigest()
            if self.on_shard_done is not None:
                self.on_shard_done(filename, self.digests[filename])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` (all of the next tensor, or its next rows) to the current shard."""
        if self._pos >= len(self._order):
            raise RuntimeError(f"writer got tensor '{name}' after the last planned tensor")
        si, entry = self._order[self._pos]
        if name != entry.name or tensor.dtype != entry.dtype:
            raise RuntimeError(f"writer expected '{entry.name}' ({entry.dtype}) but got '{name}' ({tensor.dtype})")
        if si != self._shard_index:
            self._open_shard(si)
        data = tensor.contiguous().view(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
        view = memoryview(data.numpy())
        self._hash.update(view)
        self._file.write(view)
        self._written_in_tensor += data.numel()
        self.bytes_written += data.numel()
        if self._written_in_tensor > entry.nbytes:
            raise RuntimeError(f"writer got {self._written_in_tensor} bytes for '{name}', planned {entry.nbytes}")
        if self._written_in_tensor == entry.nbytes:
            self._pos += 1
            self._written_in_tensor = 0
            self._tensors_written += 1
            if self.fault is not None and self._tensors_written == self.fault.after_tensors:
                os.kill(os.getpid(), self.fault.signal)

    def finish(self) -> None:
        """Close the last shard and write the index; every planned byte must have arrived."""
        if self._pos != len(self._order):
            missing = self._order[self._pos][1].name
            raise RuntimeError(f"merge ended before tensor '{missing}' was written")
        self._close_file()
        if self.index:
            write_index(self.folder, self.shards)

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None
