"""Read an input tensor as the merge method must see it: LoRA folded in, vocabulary rows permuted and filled.

A plain input is read as stored. An input with a low-rank update gets `scale * B @ A` added to the rows read. An input
with a row map (a tokenizer merge gave the output a different vocabulary) is gathered row by row: output row i is the
input's row `map[i]`, or a fill (the mean of rows taken from other models' tensors, zeros when there are none), or a
padding row (the mean of this input's permuted vocabulary rows, as mergekit pads with). Only the rows of the requested
chunk are read, in bounded pieces, so a row-chunked embedding stays within the memory budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .dtypes import itemsize
from .lora import LowRankUpdate
from .safetensors_header import TensorInfo
from .tensor_reader import TensorReader

FILL = -1  # output row comes from RowMap.fills
PAD = -2  # output row is padding: the mean of the permuted vocabulary rows
_PIECE_BYTES = 1 << 20  # largest single read while gathering scattered rows

Alloc = Callable[[int], torch.Tensor]
Rows = Optional[tuple[int, int]]


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as stored, plus the adapter update folded into it when read."""

    info: TensorInfo
    lora: Optional[LowRankUpdate] = None


@dataclass(frozen=True)
class RowFill:
    """An output row this input lacks: the mean of the listed (tensor, row) pairs; no pairs means zeros."""

    donors: tuple[tuple[StoredTensor, int], ...]


@dataclass(eq=False)
class RowMap:
    """Output row -> input row (>= 0), FILL (see `fills`) or PAD, for one input of a vocabulary tensor."""

    rows: torch.Tensor  # int64, one entry per output row
    fills: dict[int, RowFill]
    vocab_rows: int  # rows below this are vocabulary; PAD rows average them
    _pad_mean: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def out_rows(self) -> int:
        return int(self.rows.numel())


def read_stored(reader: TensorReader, stored: StoredTensor, rows: Rows = None, alloc: Optional[Alloc] = None) -> torch.Tensor:
    """Rows [a, b) (or all) of a stored tensor, with its LoRA update folded in."""
    x = reader.read(stored.info, rows, alloc=alloc)
    if stored.lora is None or x.numel() == 0:
        return x
    delta = stored.lora.delta_rows(reader.read, rows)
    return stored.lora.fold_into(x, delta.view(x.shape))


def read_input(reader: TensorReader, stored: StoredTensor, row_map: Optional[RowMap], rows: Rows, alloc: Optional[Alloc] = None) -> torch.Tensor:
    """One merge input for output rows [a, b) (or all of them)."""
    if row_map is None:
        return read_stored(reader, stored, rows, alloc)
    a, b = rows if rows is not None else (0, row_map.out_rows)
    return _gather(reader, stored, row_map, a, b, alloc)


def _row_shape(info: TensorInfo) -> tuple[int, ...]:
    return tuple(info.shape[1:])


def row_bytes(info: TensorInfo) -> int:
    """Bytes of one first-dimension row (from shape and dtype: a computed tensor has no byte range)."""
    return math.prod(info.shape[1:]) * itemsize(info.torch_dtype)


def _gather(reader: TensorReader, stored: StoredTensor, row_map: RowMap, a: int, b: int, alloc: Optional[Alloc]) -> torch.Tensor:
    info = stored.info
    shape = (b - a, *_row_shape(info))
    dtype = info.torch_dtype
    nbytes = (b - a) * row_bytes(info)
    out = (alloc(nbytes) if alloc is not None and nbytes else torch.empty(nbytes, dtype=torch.uint8)).view(dtype).view(shape)
    index = row_map.rows[a:b]
    _copy_runs(reader, stored, index, out)
    for pos in torch.nonzero(index == FILL).flatten().tolist():
        out[pos] = _fill_row(reader, row_map.fills[a + pos], _row_shape(info)).to(dtype)
    pads = torch.nonzero(index == PAD).flatten()
    if pads.numel():
        out[pads] = _pad_mean(reader, stored, row_map).to(dtype)
    return out


def _copy_runs(reader: TensorReader, stored: StoredTensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """Copy every mapped input row into place, one read per run of consecutive rows (capped in size)."""
    cap = max(1, _PIECE_BYTES // max(1, row_bytes(stored.info)))
    idx = index.tolist()
    pos = 0
    while pos < len(idx):
        start = idx[pos]
        if start < 0:
            pos += 1
            continue
        n = 1
        while pos + n < len(idx) and n < cap and idx[pos + n] == start + n:
            n += 1
        out[pos : pos + n].copy_(read_stored(reader, stored, (start, start + n)))
        pos += n


def _fill_row(reader: TensorReader, fill: RowFill, row_shape: tuple[int, ...]) -> torch.Tensor:
    """The mean of the donor rows in float32, summed in donor order as mergekit does; zeros without donors."""
    total = torch.zeros(row_shape, dtype=torch.float32)
    for donor, row in fill.donors:
        total = total + read_stored(reader, donor, (row, row + 1))[0].float()
    return total / len(fill.donors) if fill.donors else total


def _pad_mean(reader: TensorReader, stored: StoredTensor, row_map: RowMap) -> torch.Tensor:
    """Mean of this input's permuted vocabulary rows, streamed in pieces and computed once per row map."""
    if row_map._pad_mean is None:
        info = stored.info
        step = max(1, _PIECE_BYTES // max(1, row_bytes(info)))
        total = torch.zeros(_row_shape(info), dtype=torch.float64)
        for start in range(0, row_map.vocab_rows, step):
            end = min(start + step, row_map.vocab_rows)
            total += _gather(reader, stored, row_map, start, end, None).double().sum(dim=0)
        row_map._pad_mean = (total / max(1, row_map.vocab_rows)).float()
    return row_map._pad_mean
