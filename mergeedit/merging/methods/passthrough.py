"""passthrough: one input per tensor, copied (optionally times `scale`); the building block of layer stacking."""

from __future__ import annotations

import torch

from .spec import MergeInputs, MergeMethod, Param


def _merge(inputs: MergeInputs) -> torch.Tensor:
    scale = inputs.per_input[0].get("scale")
    x = inputs.tensors[0]
    return x if scale is None or scale == 1 else x * scale


PASSTHROUGH = MergeMethod(
    name="passthrough",
    params=(Param("scale", float, "input", None),),
    merge=_merge,
    base_model="optional",
    max_inputs=1,
    description="copy the single input (optionally scaled)",
)

# Used by the planner for tensors no arithmetic applies to (integer or boolean buffers): the first input, as stored.
COPY = MergeMethod(name="copy", params=(), merge=lambda inputs: inputs.tensors[0], description="copy")
