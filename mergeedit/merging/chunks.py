"""The merge math of one chunk: its inputs read and cast as the method computes with them, cut into cache-sized
blocks, merged into the output buffer. Used by the executor and by a merge graph's computed reads alike."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import torch

from ..io.source_reader import read_input
from ..io.tensor_reader import TensorReader
from .methods.spec import MergeInputs, TensorStatistics
from .plan import PlannedTensor

DEFAULT_BLOCK = 1 << 18  # elements per block: big enough to amortise per-op overhead (2^16 and 2^17 measured no faster)
SAMPLE = 1 << 14  # elements of the strided sample a statistic may aim with before its first pass


def probe_inputs(t: PlannedTensor, kernels: Any = None) -> MergeInputs:
    """MergeInputs carrying parameters but no data: enough for a method to say which statistics it needs (and, with
    the merge's `kernels`, which compiled kernels to request)."""
    return MergeInputs(t.name, [None] * len(t.sources), t.base, t.shared, t.per_input, 0, t.numel, t.seed, shape=tuple(t.shape), kernels=kernels,
                       dtype=t.compute_dtype)


def build_statistics(t: PlannedTensor) -> Optional[TensorStatistics]:
    return t.method.statistics(probe_inputs(t)) if t.method.statistics else None


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in `x`. A NaN or Inf anywhere makes the sum non-finite, and one vectorized sum costs ~40x less than
    isfinite().all(); only when the sum is not finite (which a huge but finite sum can also cause) look element-wise."""
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return math.isfinite(float(total)) or bool(torch.isfinite(x).all())


def merge_chunk(
    t: PlannedTensor, rows: Optional[tuple[int, int]], stored: list[torch.Tensor], stats: Any, out: torch.Tensor, block: int = DEFAULT_BLOCK,
    kernels: Any = None,
) -> Optional[MergeInputs]:
    """Merge the inputs of rows [a, b) of `t` (or all of it) into `out`, block by block. Returns the first block whose
    output holds NaN/Inf (the caller words the error), else None."""
    flat = out.view(-1)
    for start, inputs in input_blocks(t, rows, stored, block, kernels):
        inputs.stats = stats
        merged = t.method.merge(inputs)
        if merged.numel() != inputs.tensors[0].numel():
            raise RuntimeError(f"method {t.method.name} returned {merged.numel()} elements for a block of '{t.name}', expected {inputs.tensors[0].numel()}")
        if t.method.elementwise:
            written = flat[start : start + merged.numel()]
            written.copy_(merged.reshape(-1))
        else:
            written = out
            out.copy_(merged.reshape(out.shape))
        if t.out_dtype.is_floating_point and not all_finite(written):
            return inputs
    return None


def load_inputs(
    reader: TensorReader, t: PlannedTensor, rows: Optional[tuple[int, int]], alloc=None, readers: Optional[ThreadPoolExecutor] = None,
    keep_in_cache: bool = False, drop_after: bool = False,
) -> list[torch.Tensor]:
    """The inputs of `t` for rows [a, b) (or whole), as its method must see them (adapters folded, vocabularies mapped).

    With `readers`, the inputs are read at the same time: direct reads from several files keep the disk busy where
    one synchronous read at a time left it idle between requests. `keep_in_cache`, `drop_after`: TensorReader.mode."""

    def read(src):
        with reader.mode(keep_in_cache, drop_after):
            return read_input(reader, src.stored, src.row_map, rows, alloc=alloc)
    if readers is None or len(t.sources) < 2:
        return [read(src) for src in t.sources]
    return list(readers.map(read, t.sources))


def cast_input(t: PlannedTensor, x: torch.Tensor) -> torch.Tensor:
    """An input as the method computes with it."""
    if t.load_dtype is not None:
        x = x.to(t.load_dtype)
    return x.to(t.compute_dtype)


def sample_inputs(t: PlannedTensor, rows: Optional[tuple[int, int]], stored: list[torch.Tensor], size: int = SAMPLE) -> MergeInputs:
    """About `size` elements at a fixed stride through a chunk's inputs, cast as its blocks are: what a statistic
    aims with. Deterministic, so the same inputs give the same sample (a statistic must never depend on it for its
    answer, only for its speed)."""
    flat = [x.reshape(-1) for x in stored]
    n = flat[0].numel() if flat else 0
    stride = max(1, n // size)
    offset = rows[0] * (t.numel // t.rows) if rows and t.rows else 0
    return MergeInputs(t.name, [cast_input(t, x[::stride][:size]) for x in flat], t.base, t.shared, t.per_input, offset, t.numel, t.seed, shape=tuple(t.shape))


def input_blocks(t: PlannedTensor, rows: Optional[tuple[int, int]], stored: list[torch.Tensor], block: int = DEFAULT_BLOCK, kernels: Any = None):
    """(offset in the chunk, MergeInputs) for each cache-sized block of a chunk (the whole chunk for non-elementwise
    methods); `kernels`: the merge's fused.KernelCompiler, handed to the method with each block."""
    row_elems = t.numel // t.rows if t.rows else 0
    chunk_offset = rows[0] * row_elems if rows else 0
    cast = lambda x: cast_input(t, x)  # noqa: E731

    if not t.method.elementwise:
        yield 0, MergeInputs(t.name, [cast(x) for x in stored], t.base, t.shared, t.per_input, chunk_offset, t.numel, t.seed, shape=tuple(t.shape), kernels=kernels)
        return
    flat = [x.reshape(-1) for x in stored]
    n = flat[0].numel() if flat else 0
    for start in range(0, max(n, 1), block):
        end = min(start + block, n)
        yield start, MergeInputs(t.name, [cast(x[start:end]) for x in flat], t.base, t.shared, t.per_input, chunk_offset + start, t.numel, t.seed, shape=tuple(t.shape), kernels=kernels)
