"""model_stock (Model Stock, arXiv 2403.19522) with mergekit 0.1.5 semantics.

With N >= 2 fine-tunes of one base: cos = the mean pairwise cosine of their task vectors x_i - base,
t = N·cos / (1 + (N-1)·cos), out = t·mean(x_i) + (1-t)·base. Where the denominator vanishes (|.| < 1e-6) t = 0: the
base is kept rather than amplifying opposing updates. A product of norms is floored at 1e-6, so zero task vectors give
cos = 0 and t = 0. `filter_wise` computes t per vector along the last axis (each row of a matrix); 1-D tensors are
one vector either way. The cosines come from a streamed Gram matrix of the task vectors (gram.py).

In bfloat16/float16 (a config's `dtype`) mergekit computes all of this in the dtype: each task vector, norm, dot
product, cosine, their mean, t, the models' mean and the final mix rounded to it. `_low_precision_statistics` and
`_low_precision_merge` reproduce that op sequence (lowp.py: the same torch ops on blocks, reductions summed in float64
and rounded as torch rounds its float32 total).
"""

from __future__ import annotations

import torch

from .gram import GramStatistics, Mix, apply_mix
from .lowp import StagedSums, is_low_precision, round_norm, round_total
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


def _pairs(count: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(count) for j in range(i + 1, count)]


def _offsets(block: MergeInputs) -> list[torch.Tensor]:
    base = block.tensors[block.base]
    return [block.tensors[i] - base for i in block.non_base]


def _low_precision_terms(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
    """Squares (exact in float32) for each norm, then the rounded products mergekit sums for each pair's dot."""
    offsets = _offsets(block)
    return [o.to(torch.float32).square() for o in offsets] + [offsets[i] * offsets[j] for i, j in _pairs(len(offsets))]


def low_precision_ratio(totals: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """[groups] t in `dtype` from the float64 totals of _low_precision_terms, by mergekit's ops in the dtype."""
    norms = [round_norm(totals[i], dtype) for i in range(count)]
    cosines = []
    for p, (i, j) in enumerate(_pairs(count)):
        norm_product = norms[i] * norms[j]
        cosines.append((round_total(totals[count + p], dtype) / norm_product.clamp(min=NORM_PRODUCT_FLOOR)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)


def _low_precision_statistics(inputs: MergeInputs, grouping: str) -> StagedSums:
    count = len(inputs.non_base)
    dtype = inputs.dtype

    def after(stats: StagedSums, totals: torch.Tensor) -> None:
        stats.values["t"] = low_precision_ratio(totals, count, dtype)

    stats = StagedSums(inputs.shape, grouping, [_low_precision_terms], [after])
    if inputs.numel == 0:
        stats.stop()
    return stats


def _low_precision_merge(inputs: MergeInputs) -> torch.Tensor:
    """mergekit's `t * average + (1 - t) * w_0` with `average = sum(ws) / count`, each op in the dtype."""
    stats: StagedSums = inputs.stats
    ws = [inputs.tensors[i] for i in inputs.non_base]
    w0 = inputs.tensors[inputs.base]
    if w0.numel() == 0:
        return w0.clone()
    t = stats.per_element(stats.values["t"], inputs)
    total = ws[0]
    for w in ws[1:]:
        total = total + w
    average = total / len(ws)
    return t * average + (1 - t) * w0


def _merge(inputs: MergeInputs) -> torch.Tensor:
    if isinstance(inputs.stats, StagedSums):
        return _low_precision_merge(inputs)
    return apply_mix(inputs)


def _statistics(inputs: MergeInputs):
    models = tuple(inputs.non_base)
    grouping = "last_axis" if inputs.shared["filter_wise"] else "tensor"
    if is_low_precision(inputs.dtype):
        return _low_precision_statistics(inputs, grouping)

    def finish(gram: torch.Tensor) -> Mix:
        t = model_stock_ratio(gram)
        coefficients = torch.cat([(1 - t).unsqueeze(1), (t / len(models)).unsqueeze(1).expand(-1, len(models))], dim=1)
        return Mix(coefficients, (inputs.base, *models), None, inputs.shape, grouping)

    return GramStatistics(models, inputs.base, inputs.shape, grouping, finish)


MODEL_STOCK = MergeMethod(
    name="model_stock",
    params=(Param("filter_wise", bool, "shared", False),),
    merge=_merge,
    base_model="required",
    min_inputs=3,
    statistics=_statistics,
    description="base plus the models' mean, weighted by their task vectors' mean cosine (Model Stock)",
    low_precision_compute=True,  # mergekit computes it in the dtype; _low_precision_* reproduce its roundings
)
