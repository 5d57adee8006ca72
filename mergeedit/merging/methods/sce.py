"""sce (Select, Calculate, Erase; mergekit 0.1.5 semantics).

tau_i = x_i - base. Select: when 0 < select_topk < 1, keep only the k = int(select_topk * count(var != 0)) positions
with the largest variance of tau across models (population variance); select_topk <= 0 keeps none. Calculate: one
weight per model and tensor, w_i = mean(tau_i^2) over the selected tensor (zeros included) / sum over models, or
uniform when that sum is below 1e-6. Erase: an entry of tau_i counts only if its sign equals sign(sum_i tau_i) (zero
entries never count). Result: base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6).

The variance threshold (exact, via KthLargest) and the weights are whole-tensor numbers, gathered by `SceStatistics`
in streaming passes; the merge is then elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .lowp import is_low_precision
from .ordered import ordered_sum
from .selection import KthLargest, TieOrder, magnitude_bits, tie_order_bytes
from .spec import MergeInputs, MergeMethod, Param

WEIGHT_SUM_EPS = 1e-6  # below this sum of mean squares the models are weighted equally
DIVISOR_MIN = 1e-6  # clamp of the per-entry sum of agreeing weights


def task_vectors(inputs: MergeInputs) -> torch.Tensor:
    """(models, elements) stack of x_i - base over the non-base inputs."""
    base = inputs.tensors[inputs.base]
    return torch.stack([inputs.tensors[i] - base for i in inputs.non_base])


def variance_bits(tvs: torch.Tensor) -> torch.Tensor:
    """Bit patterns of the population variance across models, by the two-pass formula: torch.var over the short model
    axis runs ~40x slower (a reduction of 2-3 values per element); its Welford rounding can differ in the last ulp,
    which can only move the selection boundary between values that are equal to within an ulp.

    bfloat16/float16 task vectors: torch.var in that dtype computes in float32 and rounds the variance once to the
    dtype; here the two-pass variance of the same values in float64, rounded to float32 and then to the dtype (the
    same value unless float32's rounding lands within 1e-7 of a bfloat16/float16 rounding boundary)."""
    if is_low_precision(tvs.dtype):
        wide = tvs.to(torch.float64)
        centred = wide - wide.sum(dim=0).div_(tvs.shape[0])
        var = centred.square_().sum(dim=0).div_(tvs.shape[0])
        return magnitude_bits(var.to(torch.float32).to(tvs.dtype))
    mean = tvs.sum(dim=0).div_(tvs.shape[0])
    var = torch.zeros_like(mean)
    for tv in tvs:
        var.add_((tv - mean).square_())
    return magnitude_bits(var.div_(tvs.shape[0]))


@dataclass
class SceStatistics:
    """Pass 0: count of nonzero variances and the high histogram of the variances; pass 1: the low histogram; pass 2,
    only when more variances equal the k-th largest than the k-th place needs: which tied ones are kept (exactly k
    are kept, the tied ones those mergekit's torch.topk over the whole tensor keeps: TieOrder; above TIE_ORDER_LIMIT
    elements the lowest positions); last pass (the only one when nothing is selected): sum of squares of each
    selected task vector."""

    topk: float
    models: int
    numel: int
    select: Optional[KthLargest] = None
    keep_none: bool = False
    nonzero: int = 0
    sum_squares: list[float] = field(default_factory=list)
    ties_pass: bool = False
    dtype: torch.dtype = torch.float32  # the compute dtype: mergekit's topk sees the variances in it

    def __post_init__(self) -> None:
        if 0 < self.topk < 1:
            # k is known only after pass 0 has counted the nonzero variances
            self.select = KthLargest(1, TieOrder("topk", self.numel, self.dtype))
        self.keep_none = self.topk <= 0
        self.passes = 3 if self.select else 1
        self.sum_squares = [0.0] * self.models

    @property
    def selection_bytes(self) -> int:
        return tie_order_bytes([self.select])

    def observe(self, pass_index: int, block: MergeInputs) -> None:
        if self.keep_none:  # nothing survives the selection: every sum of squares stays 0, so skip the work
            return
        tvs = task_vectors(block)
        if self.select is not None and pass_index < self.passes - 1:
            bits = variance_bits(tvs)
            if pass_index == 0:
                self.nonzero += int(torch.count_nonzero(bits))
                self.select.observe_high(bits)
            elif pass_index == 1:
                self.select.observe_low(bits)
            else:
                self.select.observe_ties(bits, block.offset)
            return
        self.apply_selection(tvs, block.offset)
        for i in range(self.models):
            self.sum_squares[i] = ordered_sum(tvs[i].square(), self.sum_squares[i])  # element order

    def end_pass(self, pass_index: int) -> None:
        if self.select is None or pass_index >= self.passes - 1 or self.keep_none:
            return
        if pass_index == 0:
            # mergekit's count is a tensor, so the product is rounded in float32: int(90 * 0.7) is 63 there, not 62
            self.select.k = int(torch.tensor(self.nonzero) * self.topk)
            if self.select.k == 0:
                self.keep_none = True
                return
            self.select.end_high()
        elif pass_index == 1:
            self.select.end_low()
            if self.select.needs_cutoff:
                self.ties_pass = True
                self.passes = 4
        else:
            self.select.end_ties()

    def result(self) -> "SceStatistics":
        return self

    def apply_selection(self, tvs: torch.Tensor, offset: int) -> torch.Tensor:
        """Zero, in place, the positions of a block's task vectors (starting at element `offset`) that the variance
        selection drops."""
        if self.keep_none:
            return tvs.zero_()
        if self.select is not None:
            tvs.mul_(self.select.keeps(variance_bits(tvs), offset).view(tvs.shape[1:]))
        return tvs

    def weights(self, dtype: torch.dtype = torch.float32) -> list[float]:
        """Each model's mean square over the sum of them. For bfloat16/float16 as mergekit computes them in the dtype:
        each mean rounded to it, their sum accumulated in float32 and rounded, each quotient rounded."""
        means = [s / self.numel if self.numel else 0.0 for s in self.sum_squares]
        if dtype not in (torch.bfloat16, torch.float16):
            total = sum(means)
            if abs(total) < WEIGHT_SUM_EPS:
                return [1.0 / self.models] * self.models
            return [m / total for m in means]
        rounded = torch.tensor(means, dtype=torch.float64).to(dtype)
        total = rounded.to(torch.float32).cumsum(0)[-1].to(dtype).item()  # float32 running sum, rounded once
        if abs(total) < WEIGHT_SUM_EPS:
            return (torch.ones(self.models, dtype=dtype) / self.models).tolist()
        return (rounded / total).tolist()


def _statistics(inputs: MergeInputs) -> Optional[SceStatistics]:
    if inputs.base is None or not inputs.non_base:
        return None
    return SceStatistics(inputs.shared["select_topk"], len(inputs.non_base), inputs.numel, dtype=inputs.dtype or torch.float32)


def _merge(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.tensors[inputs.base]
    if not inputs.non_base:
        return base.clone()
    stats: SceStatistics = inputs.stats
    tvs = stats.apply_selection(task_vectors(inputs), inputs.offset)
    elected = torch.where(tvs.sum(dim=0) >= 0, 1.0, -1.0).to(tvs.dtype)
    weights = torch.tensor(stats.weights(tvs.dtype), dtype=tvs.dtype).unsqueeze(-1)
    agreeing = (tvs.sign() == elected).to(tvs.dtype).mul_(weights)
    merged = (tvs * agreeing).sum(dim=0).div_(agreeing.sum(dim=0).clamp_(min=DIVISOR_MIN))
    return base + merged


SCE = MergeMethod(
    name="sce",
    params=(
        Param("int8_mask", bool, "shared", False),  # accepted for mergekit configs; masks here are always compact
        Param("select_topk", float, "shared", 1.0, bounds=(0.0, 1.0)),
    ),
    merge=_merge,
    low_precision_compute=True,  # mergekit's sce computes in the dtype; the merge above is its op sequence
    base_model="required",
    statistics=_statistics,
    description="keep the highest-variance entries, weight models by mean squared task vector, erase minority signs (SCE)",
)
