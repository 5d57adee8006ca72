"""nearswap: move the base towards the other model only where the two are already close.

w = clamp(t / |base - other|, 0, 1); out = w * other + (1 - w) * base. Entries closer than `t` take the other model's
value, far ones move by exactly `t` towards it. As in mergekit the distance is floored at 1e-6, so equal entries give
w = clamp(t / 1e-6, 0, 1) and the output equals both inputs there: no division by zero, no NaN.
"""

from __future__ import annotations

import torch

from .spec import MergeInputs, MergeMethod, Param

MIN_DISTANCE = 1e-6  # mergekit's floor on |base - other|


def nearswap_merge(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.tensors[inputs.base]
    other = inputs.tensors[inputs.non_base[0]]
    weight = (inputs.shared["t"] / (base - other).abs().clamp_(min=MIN_DISTANCE)).clamp_(0, 1)
    return weight * other + (1 - weight) * base


NEARSWAP = MergeMethod(
    name="nearswap",
    params=(Param("t", float, "shared"),),
    merge=nearswap_merge,
    base_model="required",
    min_inputs=2,
    max_inputs=2,
    # the formula is mergekit's op for op, so a bfloat16/float16 block rounds where mergekit's does
    low_precision_compute=True,
    description="take the other model's value where it lies within t of the base, else step t towards it",
)
