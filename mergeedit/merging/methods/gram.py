"""Merges that mix the inputs linearly, with coefficients that depend only on inner products of whole vectors.

slerp, nuslerp, multislerp, karcher and model_stock all produce out = sum_j c_j x_j (or base + sum_i c_i (x_i - base))
where the c come from the Gram matrix of some vectors (the inputs or their task vectors): norms, cosines, angles.
So one streaming pass accumulates that Gram matrix in float64, the coefficients are computed once from it, and the
merge itself is elementwise and runs block by block, however the executor cuts the tensor.

A tensor is one vector, or (row-wise variants) a set of vectors: `last_axis` makes every run along the last axis its
own vector (each row of a matrix), `first_axis` every run along the first axis (each column). 0-D and 1-D tensors
are always one vector, as in mergekit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch

from .ordered import ordered_sum
from .spec import MergeInputs

Grouping = Literal["tensor", "last_axis", "first_axis"]


def effective_grouping(shape: tuple[int, ...], grouping: Grouping) -> Grouping:
    return "tensor" if len(shape) <= 1 or math.prod(shape) == 0 else grouping


def group_count(shape: tuple[int, ...], grouping: Grouping) -> int:
    grouping = effective_grouping(shape, grouping)
    if grouping == "last_axis":
        return math.prod(shape) // shape[-1]
    if grouping == "first_axis":
        return math.prod(shape) // shape[0]
    return 1


def group_ids(shape: tuple[int, ...], grouping: Grouping, offset: int, n: int) -> Optional[torch.Tensor]:
    """The vector each element of the flat block [offset, offset + n) belongs to; None when the tensor is one vector."""
    grouping = effective_grouping(shape, grouping)
    if grouping == "tensor":
        return None
    flat = torch.arange(offset, offset + n, dtype=torch.int64)
    if grouping == "last_axis":
        return flat.div_(shape[-1], rounding_mode="floor")
    return flat.remainder_(math.prod(shape) // shape[0])


@dataclass(frozen=True)
class Mix:
    """out = sum_k coefficients[g, k] * v_k for the vector g an element belongs to.

    v_k is input `terms[k]`, or its task vector x - base when `around_base` is set (and the base is then added).
    """

    coefficients: torch.Tensor  # [groups, len(terms)] float64
    terms: tuple[int, ...]
    around_base: Optional[int]
    shape: tuple[int, ...]
    grouping: Grouping


def apply_mix(inputs: MergeInputs) -> torch.Tensor:
    """The elementwise merge shared by every Gram-coefficient method."""
    mix: Mix = inputs.stats
    xs = inputs.tensors
    ids = group_ids(mix.shape, mix.grouping, inputs.offset, xs[0].numel())
    base = xs[mix.around_base] if mix.around_base is not None else None
    out = base.clone() if base is not None else torch.zeros_like(xs[0])
    per_element = mix.coefficients.to(xs[0].dtype)[ids] if ids is not None else None  # cast the few rows, then gather
    for k, i in enumerate(mix.terms):
        v = xs[i] - base if base is not None else xs[i]
        if per_element is None:
            out.add_(v, alpha=float(mix.coefficients[0, k]))
        else:
            out.addcmul_(v, per_element[:, k].view(v.shape))
    return out


@dataclass
class GramStatistics:
    """Accumulates, in one streaming pass, the float64 Gram matrix of the vectors `vectors` (minus input `base` when
    set), per vector group; `finish` turns it ([groups, k, k]) into the Mix the merge applies."""

    vectors: tuple[int, ...]
    base: Optional[int]
    shape: tuple[int, ...]
    grouping: Grouping
    finish: Callable[[torch.Tensor], Mix]
    passes: int = 1
    _sums: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        k = len(self.vectors)
        self._sums = torch.zeros(k, k, group_count(self.shape, self.grouping), dtype=torch.float64)

    def observe(self, pass_index: int, block: MergeInputs) -> None:
        xs = block.tensors
        base = xs[self.base].to(torch.float64) if self.base is not None else None
        v = torch.stack([xs[i].to(torch.float64) - base if base is not None else xs[i].to(torch.float64) for i in self.vectors])
        ids = group_ids(self.shape, self.grouping, block.offset, v.shape[1])
        if ids is None:  # element order, not a BLAS product: the same additions however the tensor is cut
            for a in range(len(self.vectors)):
                for b in range(a + 1):
                    self._sums[a, b, 0] = ordered_sum(v[a] * v[b], float(self._sums[a, b, 0]))
            return
        for a in range(len(self.vectors)):
            for b in range(a + 1):
                self._sums[a, b].index_add_(0, ids, v[a] * v[b])

    def end_pass(self, pass_index: int) -> None:
        pass

    def gram(self) -> torch.Tensor:
        """[groups, k, k], symmetric."""
        lower = self._sums.permute(2, 0, 1).tril()
        return lower + lower.tril(-1).transpose(1, 2)

    def result(self) -> Mix:
        return self.finish(self.gram())
