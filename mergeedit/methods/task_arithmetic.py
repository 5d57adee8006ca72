"""The task-arithmetic family: task_arithmetic, ties, dare_ties, dare_linear.

One algorithm (as in mergekit): delta_i = x_i - base; sparsify each delta (top-k magnitude or a seeded Bernoulli
mask), optionally rescale it to its original L1 norm; weight it; optionally keep only entries agreeing with the
elected sign (sign of the weighted sum); sum; optionally normalize by the weights that contributed; times lambda;
add the base. Sparsification needs whole-tensor numbers (the k-th magnitude, the L1 norms), gathered by
`DeltaStatistics` so the merge itself is elementwise and can run on row chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .seeded_random import derive_seed, seeded_uniform
from .selection import KthLargest, magnitude_bits
from .spec import MergeInputs, MergeMethod, Param

Sparsify = Optional[Literal["magnitude", "random"]]
RESCALE_EPS = 1e-7  # below this L1 norm mergekit leaves a masked delta unscaled


def deltas_of(inputs: MergeInputs) -> list[torch.Tensor]:
    """Task vectors of the non-base inputs, computed once per chunk, in place (the executor owns the buffers)."""
    if "deltas" not in inputs.cache:
        base = inputs.tensors[inputs.base]
        inputs.cache["deltas"] = [inputs.tensors[i].sub_(base) for i in inputs.non_base]
    return inputs.cache["deltas"]


def _density(inputs: MergeInputs, j: int) -> float:
    return inputs.per_input[inputs.non_base[j]]["density"]


def _keep_count(density: float, numel: int) -> int:
    return max(1, int(density * numel))


def _needs_sparsify(density: float) -> bool:
    return density < 1


def _random_keep(inputs: MergeInputs, j: int, delta: torch.Tensor) -> torch.Tensor:
    key = ("keep", j)
    if key not in inputs.cache:
        noise = seeded_uniform(derive_seed(inputs.seed, inputs.non_base[j]), inputs.offset, delta.numel())
        inputs.cache[key] = (noise < _density(inputs, j)).view(delta.shape)
    return inputs.cache[key]


def _magnitude_bits(inputs: MergeInputs, j: int, delta: torch.Tensor) -> torch.Tensor:
    key = ("bits", j)
    if key not in inputs.cache:
        inputs.cache[key] = magnitude_bits(delta)
    return inputs.cache[key]


@dataclass
class DeltaStatistics:
    """Per non-base input: the exact magnitude threshold (magnitude) and the L1 norms before/after masking (rescale)."""

    sparsify: Sparsify
    rescale: bool
    selectors: dict[int, KthLargest]
    sparse: list[int]  # indices j (into non_base) that are sparsified
    passes: int = 1

    def __post_init__(self) -> None:
        self.before = {j: 0.0 for j in self.sparse}
        self.after = {j: 0.0 for j in self.sparse}

    def observe(self, pass_index: int, chunk: MergeInputs) -> None:
        deltas = deltas_of(chunk)
        for j in self.sparse:
            d = deltas[j]
            if self.sparsify == "magnitude":
                bits = _magnitude_bits(chunk, j, d)
                if pass_index == 0:
                    self.selectors[j].observe_high(bits)
                elif pass_index == 1:
                    self.selectors[j].observe_low(bits)
                    if self.rescale:
                        self.before[j] += float(d.abs().sum(dtype=torch.float64))
                else:
                    keep = bits >= self.selectors[j].threshold_bits
                    self.after[j] += float((d.abs() * keep).sum(dtype=torch.float64))
            else:
                keep = _random_keep(chunk, j, d)
                a = d.abs()
                self.before[j] += float(a.sum(dtype=torch.float64))
                self.after[j] += float((a * keep).sum(dtype=torch.float64))

    def end_pass(self, pass_index: int) -> None:
        if self.sparsify == "magnitude":
            for sel in self.selectors.values():
                sel.end_high() if pass_index == 0 else sel.end_low() if pass_index == 1 else None

    def result(self) -> "DeltaStatistics":
        return self

    def scale(self, j: int) -> float:
        if not self.rescale or self.before[j] < RESCALE_EPS or self.after[j] < RESCALE_EPS:
            return 1.0
        return self.before[j] / self.after[j]


def _statistics_for(sparsify: Sparsify):
    def build(inputs: MergeInputs) -> Optional[DeltaStatistics]:
        if sparsify is None or inputs.base is None:
            return None
        rescale = bool(inputs.shared["rescale"])
        sparse = [j for j in range(len(inputs.non_base)) if 0 < _density(inputs, j) < 1]
        if not sparse:
            return None
        if sparsify == "magnitude":
            selectors = {j: KthLargest(_keep_count(_density(inputs, j), inputs.numel)) for j in sparse}
            return DeltaStatistics(sparsify, rescale, selectors, sparse, passes=3 if rescale else 2)
        if not rescale:
            return None  # a random mask needs no whole-tensor numbers
        return DeltaStatistics(sparsify, rescale, {}, sparse, passes=1)

    return build


def _sparsified(inputs: MergeInputs, sparsify: Sparsify) -> list[torch.Tensor]:
    deltas = deltas_of(inputs)
    stats: Optional[DeltaStatistics] = inputs.stats
    for j, d in enumerate(deltas):
        density = _density(inputs, j)
        if sparsify is None or density >= 1:
            continue
        if density <= 0:
            d.zero_()
            continue
        if sparsify == "magnitude":
            keep = _magnitude_bits(inputs, j, d) >= stats.selectors[j].threshold_bits
        else:
            keep = _random_keep(inputs, j, d)
        d.mul_(keep)
        if stats is not None and stats.rescale:
            factor = stats.scale(j)
            if factor != 1.0:
                d.mul_(factor)
    return deltas


def _merge_for(sparsify: Sparsify, consensus: bool):
    def merge(inputs: MergeInputs) -> torch.Tensor:
        base = inputs.tensors[inputs.base]
        if not inputs.non_base:
            return base
        weights = [inputs.per_input[i]["weight"] for i in inputs.non_base]
        deltas = _sparsified(inputs, sparsify)
        for d, w in zip(deltas, weights):
            d.mul_(w)
        if consensus:
            total = deltas[0].clone()
            for d in deltas[1:]:
                total.add_(d)
            elect_positive = total >= 0
            mixed = torch.zeros_like(base)
            divisor = torch.zeros_like(base)
            for d, w in zip(deltas, weights):
                agree = torch.where(elect_positive, d > 0, d < 0)
                mixed.add_(d * agree)
                divisor.add_(agree, alpha=w)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas[0].clone()
            for d in deltas[1:]:
                mixed.add_(d)
            total_weight = sum(weights)
            divisor = total_weight if abs(total_weight) >= 1e-8 else 1.0
        if inputs.shared["normalize"]:
            mixed.div_(divisor)
        lam = inputs.shared["lambda"]
        if lam != 1:
            mixed.mul_(lam)
        return base.add_(mixed)

    return merge


def _family(name: str, sparsify: Sparsify, consensus: bool, normalize: bool, rescale: bool, description: str) -> MergeMethod:
    params = (
        Param("int8_mask", bool, "shared", False),
        Param("normalize", bool, "shared", normalize),
        Param("rescale", bool, "shared", rescale),
        Param("lambda", float, "shared", 1.0),
        Param("weight", float, "non_base"),
        Param("density", float, "non_base", 1.0),
    )
    return MergeMethod(
        name=name,
        params=params,
        merge=_merge_for(sparsify, consensus),
        base_model="required",
        statistics=_statistics_for(sparsify),
        scratch_factor=3.0 if consensus else 1.5,
        randomized=sparsify == "random",
        description=description,
    )


TASK_ARITHMETIC = _family("task_arithmetic", None, False, False, False, "base + lambda * sum of weighted task vectors")
TIES = _family("ties", "magnitude", True, True, False, "top-k magnitude trim, sign election, disjoint mean (TIES)")
DARE_TIES = _family("dare_ties", "random", True, False, True, "random drop with L1 rescale, then sign election (DARE-TIES)")
DARE_LINEAR = _family("dare_linear", "random", False, False, True, "random drop with L1 rescale, weighted sum (DARE)")
