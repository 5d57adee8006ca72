"""model_stock (Model Stock, arXiv 2403.19522) with mergekit 0.1.5 semantics.

With N >= 2 fine-tunes of one base: cos = the mean pairwise cosine of their task vectors x_i - base,
t = N·cos / (1 + (N-1)·cos), out = t·mean(x_i) + (1-t)·base. Where the denominator vanishes (|.| < 1e-6) t = 0: the
base is kept rather than amplifying opposing updates. A product of norms is floored at 1e-6, so zero task vectors give
cos = 0 and t = 0. `filter_wise` computes t per vector along the last axis (each row of a matrix); 1-D tensors are
one vector either way. The cosines come from a streamed Gram matrix of the task vectors (gram.py).
"""

from __future__ import annotations

import torch

from .gram import GramStatistics, Mix, apply_mix
from .spec import MergeInputs, MergeMethod, Param
from .spherical import norms

NORM_PRODUCT_FLOOR = 1e-6
SINGULAR = 1e-6


def model_stock_ratio(gram: torch.Tensor) -> torch.Tensor:
    """[groups] interpolation ratio t from a [groups, N, N] Gram matrix of N task vectors."""
    n = norms(gram)
    count = gram.shape[-1]
    cosines = [
        (gram[:, i, j] / (n[:, i] * n[:, j]).clamp_min(NORM_PRODUCT_FLOOR)).clamp(-1, 1)
        for i in range(count)
        for j in range(i + 1, count)
    ]
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))


def _statistics(inputs: MergeInputs) -> GramStatistics:
    models = tuple(inputs.non_base)
    grouping = "last_axis" if inputs.shared["filter_wise"] else "tensor"

    def finish(gram: torch.Tensor) -> Mix:
        t = model_stock_ratio(gram)
        coefficients = torch.cat([(1 - t).unsqueeze(1), (t / len(models)).unsqueeze(1).expand(-1, len(models))], dim=1)
        return Mix(coefficients, (inputs.base, *models), None, inputs.shape, grouping)

    return GramStatistics(models, inputs.base, inputs.shape, grouping, finish)


MODEL_STOCK = MergeMethod(
    name="model_stock",
    params=(Param("filter_wise", bool, "shared", False),),
    merge=apply_mix,
    base_model="required",
    min_inputs=3,
    statistics=_statistics,
    description="base plus the models' mean, weighted by their task vectors' mean cosine (Model Stock)",
)
