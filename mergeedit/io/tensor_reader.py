"""Read one tensor, or a range of its rows, straight from a safetensors file into a fresh buffer.

We use positional reads (pread) on cached file descriptors instead of mmap: the bytes we hold are exactly the bytes we
asked for, so resident memory stays bounded by what the executor has in flight, whatever the shard size.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .dtypes import itemsize
from .safetensors_header import TensorInfo


@dataclass(frozen=True)
class ComputedTensorInfo(TensorInfo):
    """A tensor with no bytes on disk: read by computing it (an earlier merge's output in a merge graph).

    `compute(reader, rows, alloc)` returns what reading the stored tensor would; `inputs_bytes_per_element` is what
    computing one element holds besides the element itself, so memory budgets can count it.
    """

    compute: Callable = field(compare=False, repr=False)
    inputs_bytes_per_element: int = 0


def bytes_per_element_to_read(info: TensorInfo) -> int:
    """Bytes held per element while `info` is read: the element, plus the inputs a computed tensor needs."""
    extra = info.inputs_bytes_per_element if isinstance(info, ComputedTensorInfo) else 0
    return itemsize(info.torch_dtype) + extra


class TensorReader:
    """Thread-safe reader over many files; keeps their descriptors open for the life of a merge."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _fd(self, path) -> int:
        key = str(path)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = os.open(key, os.O_RDONLY)
                self._fds[key] = fd
            return fd

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None, alloc=None) -> torch.Tensor:
        """The tensor (or rows [a, b) of its first dimension) in its stored dtype.

        `alloc(nbytes)` may supply a reusable uint8 buffer (freshly mapped pages cost a fault each).
        """
        if isinstance(info, ComputedTensorInfo):
            return info.compute(self, rows, alloc)
        shape = list(info.shape)
        start, end = info.start, info.end
        if rows is not None:
            a, b = rows
            row_bytes = info.nbytes // shape[0] if shape and shape[0] else 0
            start, end = info.start + a * row_bytes, info.start + b * row_bytes
            shape[0] = b - a
        nbytes = end - start
        buf = alloc(nbytes) if alloc is not None else torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            fd = self._fd(info.path)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], start + done)
                if got == 0:
                    raise OSError(f"{info.path}: unexpected end of file while reading tensor '{info.name}'")
                done += got
        with self._lock:
            self.bytes_read += nbytes
        dtype = info.torch_dtype
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=dtype)
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
