"""linear: the weighted average sum_i w_i x_i (divided by sum_i w_i when `normalize`)."""

from __future__ import annotations

import torch

from .spec import MergeInputs, MergeMethod, Param


def _check(shared: dict, per_input: list[dict]) -> None:
    if shared["normalize"] and sum(p["weight"] for p in per_input) == 0:
        raise ValueError("weights sum to zero, so normalize would divide by zero; change a weight or set normalize: false")


def _merge(inputs: MergeInputs) -> torch.Tensor:
    weights = [p["weight"] for p in inputs.per_input]
    result = inputs.tensors[0] * weights[0]
    for x, w in zip(inputs.tensors[1:], weights[1:]):
        result.add_(x, alpha=w)
    if inputs.shared["normalize"]:
        result.div_(sum(weights))
    return result


LINEAR = MergeMethod(
    name="linear",
    params=(Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
    merge=_merge,
    base_model="optional",
    description="weighted average of the models",
    check=_check,
)
