"""RAM (Reinforced Agent Merging) and its tensor-local plus variant, ramplus_tl.

A task vector entry counts as changed when |x_i - base| > epsilon. An entry changed by exactly one model keeps that
model's delta whole (summed); an entry changed by several gets the mean of their deltas; the rest stay at the base.
ramplus_tl scales model i's unique entries by lambda_i = 1 + r * clamp(rho_i, 0, alpha), where rho_i is a whole-tensor
ratio: how many of model i's changed entries it shares with other models over how many only it changed (the count of
unique entries floored at epsilon, as mergekit does). The two counts per model are gathered in one streaming pass, so
the merge itself stays elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .spec import MergeInputs, MergeMethod, Param


def _changed(inputs: MergeInputs) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(deltas, changed masks, how many models changed each entry) for the non-base inputs."""
    base = inputs.tensors[inputs.base]
    eps = inputs.shared["epsilon"]
    deltas = [inputs.tensors[i] - base for i in inputs.non_base]
    changed = [d.abs() > eps for d in deltas]
    count = torch.zeros(base.shape, dtype=torch.int32)
    for mask in changed:
        count.add_(mask)
    return deltas, changed, count


@dataclass
class SharedUniqueCounts:
    """Per non-base model: how many of its changed entries other models changed too, and how many only it changed."""

    passes: int = 1
    shared: list[int] = field(default_factory=list)
    unique: list[int] = field(default_factory=list)

    def observe(self, pass_index: int, block: MergeInputs) -> None:
        _, changed, count = _changed(block)
        if not self.shared:
            self.shared = [0] * len(changed)
            self.unique = [0] * len(changed)
        overlap, alone = count > 1, count == 1
        for j, mask in enumerate(changed):
            self.shared[j] += int((mask & overlap).sum())
            self.unique[j] += int((mask & alone).sum())

    def end_pass(self, pass_index: int) -> None:
        pass

    def result(self) -> "SharedUniqueCounts":
        return self

    def unique_scale(self, j: int, r: float, alpha: float, epsilon: float) -> float:
        """lambda_j = 1 + r * clamp(rho_j, 0, alpha); only multiplies unique entries, so a model without any is moot."""
        if not self.shared:  # an empty tensor: nothing was observed
            return 1.0
        if self.unique[j] == 0:  # no unique entries to scale (and with epsilon 0, rho would divide by zero)
            return 1.0
        rho = self.shared[j] / max(float(self.unique[j]), epsilon)
        return 1.0 + r * min(max(rho, 0.0), alpha)


def _merge(inputs: MergeInputs, unique_scales: list[float]) -> torch.Tensor:
    base = inputs.tensors[inputs.base]
    if not inputs.non_base:
        return base.clone()
    deltas, changed, count = _changed(inputs)
    alone = count == 1
    shared_divisor = count.clamp(min=1).to(base.dtype)
    merged = torch.zeros_like(base)
    for delta, mask, scale in zip(deltas, changed, unique_scales):
        delta.mul_(mask)
        contribution = torch.where(alone, delta * scale if scale != 1.0 else delta, delta / shared_divisor)
        merged.add_(contribution)
    return base + merged


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _merge_rounded(inputs: MergeInputs, unique_scales: Optional[list[float]]) -> torch.Tensor:
    """A bfloat16/float16 block with mergekit's roundings (ram.py computes in the dtype): the deltas and each model's
    term (unique part + shared part / count) are in the dtype, the sum over models accumulates in float32 and rounds
    once, and base + that rounds once. ramplus_tl's lambda is a float32 tensor in mergekit, which promotes the terms,
    their sum and base + sum to float32: the result is then float32, rounded to the output dtype when written."""
    base = inputs.tensors[inputs.base]
    deltas, changed, count = _changed(inputs)
    alone, overlap, divisor = count == 1, count > 1, count.clamp(min=1)
    terms = []
    for j, (delta, mask) in enumerate(zip(deltas, changed)):
        kept = delta * mask
        unique = kept * alone
        if unique_scales is not None:
            unique = unique.to(torch.float32).mul_(unique_scales[j])
        terms.append(unique + kept * overlap / divisor)
    total = terms[0].to(torch.float32, copy=True)
    for term in terms[1:]:
        total.add_(term)
    if unique_scales is not None:
        return base.to(torch.float32) + total
    return base + total.to(base.dtype)


def ram_merge(inputs: MergeInputs) -> torch.Tensor:
    if inputs.non_base and inputs.tensors[inputs.base].dtype in LOW_PRECISION:
        return _merge_rounded(inputs, None)
    return _merge(inputs, [1.0] * len(inputs.non_base))


def _float32_unique_scale(stats: SharedUniqueCounts, j: int, r: float, alpha: float, epsilon: float) -> float:
    """lambda_j as mergekit's float32 tensors compute it: rho = shared / max(unique, epsilon), 1 + r * clamp(rho, 0,
    alpha), each step rounded to float32."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    unique = torch.clamp(f32(float(stats.unique[j])), min=f32(epsilon))
    rho = (f32(float(stats.shared[j])) / unique).clamp(min=0, max=alpha)
    return float(1 + rho * r)


def ramplus_merge(inputs: MergeInputs) -> torch.Tensor:
    stats: Optional[SharedUniqueCounts] = inputs.stats
    s = inputs.shared
    if inputs.non_base and inputs.tensors[inputs.base].dtype in LOW_PRECISION:
        scales = [_float32_unique_scale(stats, j, s["r"], s["alpha"], s["epsilon"]) if stats and stats.shared else 1.0
                  for j in range(len(inputs.non_base))]
        return _merge_rounded(inputs, scales)
    scales = [stats.unique_scale(j, s["r"], s["alpha"], s["epsilon"]) if stats else 1.0 for j in range(len(inputs.non_base))]
    return _merge(inputs, scales)


def _count_statistics(inputs: MergeInputs) -> Optional[SharedUniqueCounts]:
    return SharedUniqueCounts() if inputs.base is not None and inputs.non_base else None


RAM = MergeMethod(
    name="ram",
    params=(Param("epsilon", float, "shared", 1e-5),),
    merge=ram_merge,
    base_model="required",
    low_precision_compute=True,
    description="deltas changed by one model are kept whole, deltas changed by several are averaged (RAM)",
)

RAMPLUS_TL = MergeMethod(
    name="ramplus_tl",
    params=(Param("r", float, "shared", 0.1), Param("alpha", float, "shared", 0.2), Param("epsilon", float, "shared", 1e-5)),
    merge=ramplus_merge,
    base_model="required",
    low_precision_compute=True,
    statistics=_count_statistics,
    description="RAM with each model's unique deltas boosted by its shared/unique ratio in the tensor (RAM+, tensor-local)",
)
