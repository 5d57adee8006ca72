"""mergekit's arithmetic in bfloat16/float16, reproduced on a streamed tensor.

Where a config says `dtype: bfloat16` (or float16), mergekit runs a method's formula on tensors of that dtype, so torch
rounds the result of every operation to it:
- an elementwise op computes in float32 and rounds once (a Python number or a 0-dim float32 tensor operand keeps its
  float32 value: `x * 0.3` is float32(x) * float32(0.3), rounded);
- a reduction (`sum`, `norm`, `dot`, `mean`, `var`) accumulates in float32 and rounds the total once.
Elementwise ops are reproduced by running the same torch op on the same dtype, block by block: an element's result
does not depend on its neighbours, so the blocks give mergekit's bits. A whole-tensor (or per-row) reduction is in
general not reproduced bit for bit: torch's float32 accumulation order differs from kernel to kernel and can depend on
the tensor's length, the vector width, the threads or a library (oneDNN) of its own. So a reduction here adds the
exact float32 values of its terms in float64, in element order (methods/ordered.py: the same additions however the
tensor is cut), and rounds the total to float32 and then to the dtype, as torch rounds its float32 total. The two totals differ only by torch's float32 accumulation error, so the
rounded results differ only when a total falls within that error of a bfloat16/float16 rounding boundary (in
tools/mergekit_parity.py's configs: never, for the reductions rounded to the dtype). Where they differ, mergekit's
own value is the less accurate one. karcher's norms stay float32 in mergekit (torch.linalg.norm of the tensor cast to
float32), so there a float32 ulp shows: those passes (`torch_norm_passes`) add the squares in torch's own order
instead (methods/norm_order.py), bit for bit.

`StagedSums` streams those reductions: pass p sums, per vector group (the whole tensor, or each row/column), the terms
`stages[p]` computes from a block and the numbers finished after earlier passes; `after[p]` turns the rounded totals
into the numbers the next pass (or the merge) needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .gram import Grouping, group_count, group_ids
from .norm_order import NormSquares
from .ordered import ordered_sum
from .spec import MergeInputs

LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_low_precision(dtype: Optional[torch.dtype]) -> bool:
    return dtype in LOW_PRECISION


def round_total(total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 total as torch's reduction in `dtype` returns it: rounded to float32, then to the dtype."""
    return total.to(torch.float32).to(dtype)


def round_norm(sum_squares: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.norm of a `dtype` tensor from its float64 sum of squares: float32 total, float32 sqrt, rounded to the
    dtype. (The squares of bfloat16/float16 values are exact in float32 and float64 alike.)"""
    return sum_squares.to(torch.float32).sqrt().to(dtype)


def float32_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch's sum over a short leading axis of a stacked low-precision tensor (torch.stack(parts).sum(0)): the
    float32 running sum in order, rounded once to the parts' dtype."""
    total = parts[0].to(torch.float32, copy=True)
    for p in parts[1:]:
        total += p
    return total.to(parts[0].dtype)


Stage = Callable[[MergeInputs, Any], list[torch.Tensor]]


@dataclass
class StagedSums:
    """Whole-tensor (or per-group) sums over several streaming passes; see the module docstring.

    stages[p](block, self) returns the terms to sum in pass p (each with the block's elements, any dtype);
    after[p](self, totals) gets their float64 totals [len(terms), groups] when pass p ends. Attributes the `after`
    functions set are what later stages and the merge read. A pass in `torch_norm_passes` (whole-tensor grouping
    only) gets exact float32 squares as its terms and sums them as torch.linalg.norm of a float32 tensor does: its
    totals are those float32 sums of squares (before the sqrt)."""

    shape: tuple[int, ...]
    grouping: Grouping
    stages: list[Stage]
    after: list[Callable[[Any, torch.Tensor], None]]
    torch_norm_passes: set[int] = field(default_factory=set)
    passes: int = field(init=False)
    _totals: Optional[torch.Tensor] = field(init=False, default=None)
    _norms: Optional[list[NormSquares]] = field(init=False, default=None)
    values: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.passes = len(self.stages)

    def stop(self, done: int = 0) -> None:
        """No pass after the first `done` is needed (an empty tensor, or an `after` found the result decided)."""
        self.passes = done

    def ids(self, block: MergeInputs) -> Optional[torch.Tensor]:
        return group_ids(self.shape, self.grouping, block.offset, block.tensors[0].numel())

    def observe(self, pass_index: int, block: MergeInputs) -> None:
        terms = self.stages[pass_index](block, self)
        if pass_index in self.torch_norm_passes:
            if self._norms is None:
                self._norms = [NormSquares(math.prod(self.shape)) for _ in terms]
            for norm, term in zip(self._norms, terms):
                norm.add(term, block.offset)
            return
        if self._totals is None:
            self._totals = torch.zeros(len(terms), group_count(self.shape, self.grouping), dtype=torch.float64)
        ids = self.ids(block)
        for j, term in enumerate(terms):
            flat = term.reshape(-1)
            if ids is None:
                self._totals[j, 0] = ordered_sum(flat, float(self._totals[j, 0]))
            else:  # index_add_ adds in element order: the same additions however the tensor is cut
                self._totals[j].index_add_(0, ids, flat.to(torch.float64))

    def end_pass(self, pass_index: int) -> None:
        totals = self._totals
        self._totals = None
        if self._norms is not None:
            totals = torch.stack([n.total() for n in self._norms]).to(torch.float64).unsqueeze(1)
            self._norms = None
        if totals is None:  # an empty tensor
            totals = torch.zeros(0, group_count(self.shape, self.grouping), dtype=torch.float64)
        self.after[pass_index](self, totals)

    def result(self) -> "StagedSums":
        return self

    def per_element(self, value: torch.Tensor, block: MergeInputs) -> torch.Tensor:
        """A per-group value [groups] as a per-element tensor for `block` (a [1] value broadcasts)."""
        ids = self.ids(block)
        return value if ids is None else value[ids].view(block.tensors[0].shape)
