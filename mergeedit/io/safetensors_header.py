"""Parse and validate a safetensors header without touching tensor data.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON, then the data buffer. Every check here
exists so that a truncated or hostile file is named with the reason before we read from it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import MergeEditError
from ..core.paths import open_regular
from .dtypes import SAFETENSORS_TO_TORCH, itemsize

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte range, dtype and shape.

    A tensor may instead be computed when read (tensor_reader.ComputedTensorInfo: a merge graph's intermediate): such
    a tensor sets `compute`, and `inputs_bytes_per_element` counts what computing it holds besides itself."""

    compute = None  # stored tensors: read from `path`
    inputs_bytes_per_element = 0

    name: str
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self):
        return SAFETENSORS_TO_TORCH[self.dtype]

    @property
    def bytes_per_element_to_read(self) -> int:
        """Bytes held per element while this tensor is read: the element, plus the inputs a computed one needs."""
        return itemsize(self.torch_dtype) + self.inputs_bytes_per_element


def _bad(path: Path, reason: str) -> MergeEditError:
    return MergeEditError(f"{path}: not a valid safetensors file: {reason}; re-download or re-export the file")


def parse_header_bytes(path: Path, raw: bytes, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the JSON header `raw` of a file of `file_size` bytes; return its tensors and metadata."""
    data_start = 8 + len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad(path, f"header is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _bad(path, f"entry for tensor '{name}' is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_TO_TORCH:
            raise _bad(path, f"tensor '{name}' has dtype {dtype!r}, which torch cannot represent")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _bad(path, f"tensor '{name}' has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _bad(path, f"tensor '{name}' has invalid data_offsets {offsets!r}")
        expected = math.prod(shape) * itemsize(SAFETENSORS_TO_TORCH[dtype])
        if offsets[1] - offsets[0] != expected:
            raise _bad(path, f"tensor '{name}' spans {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} needs {expected}")
        if data_start + offsets[1] > file_size:
            raise _bad(path, f"tensor '{name}' ends at byte {data_start + offsets[1]} but the file has {file_size} (truncated?)")
        ranges.append((offsets[0], offsets[1], name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1])
    ranges.sort()
    for (_s0, e0, n0), (s1, _e1, n1) in zip(ranges, ranges[1:]):
        if s1 < e0:
            raise _bad(path, f"tensors '{n0}' and '{n1}' overlap")
    return tensors, metadata


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read only the header of `path`: 8 bytes plus the JSON, whatever the file's size."""
    path = Path(path)
    try:
        with open_regular(path, "safetensors file") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit in a file of {size} bytes")
            raw = f.read(n)
    except OSError as exc:
        raise MergeEditError(f"{path}: cannot read ({exc.strerror}); check the path and its permissions") from None
    return parse_header_bytes(path, raw, size)
