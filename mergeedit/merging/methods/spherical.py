"""Interpolation on the hypersphere: slerp, nuslerp, multislerp, karcher (mergekit 0.1.5 semantics).

Each output is a linear mix of the inputs (or of their task vectors) whose coefficients depend only on the norms and
inner products of whole vectors, so every method here is a coefficient rule over a streamed Gram matrix (see gram.py):
the angle arithmetic runs once per tensor (per row or column for nuslerp's row modes) in float64, on numbers, and the
merge is elementwise. mergekit computes the same formulas on float32 tensors; results agree to float32 rounding.

Deliberate differences from mergekit 0.1.5: karcher honours per-model `weight` (mergekit ignores it; the default 1.0
gives mergekit's equal weights), and multislerp returns the base where every task vector is zero (mergekit raises).
mergekit's karcher takes arccos of float32 dot products, which near 1 resolve angles only to ~3.5e-4 rad: a model that
close to the mean gets theta = 0 < tol and is dropped from the tangent step, so on nearly parallel tensors (fine-tunes'
norms) mergekit is off by up to ~5e-4; we match its algorithm evaluated in float64 (to ~1e-7) instead of copying that.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ...core.errors import MergeEditError
from .gram import GramStatistics, Grouping, Mix, apply_mix
from .lowp import StagedSums, float32_sum, is_low_precision, round_norm, round_total
from .norm_order import sqrt32
from .spec import MergeInputs, MergeMethod, Param


class KnownMix:
    """Statistics for a tensor whose mix needs no data (a single model is copied): no streaming pass."""

    passes = 0

    def __init__(self, mix: Mix) -> None:
        self.mix = mix

    def observe(self, pass_index: int, block: MergeInputs) -> None:
        pass

    def end_pass(self, pass_index: int) -> None:
        pass

    def result(self) -> Mix:
        return self.mix


def copy_of(inputs: MergeInputs, index: int) -> KnownMix:
    return KnownMix(Mix(torch.ones(1, 1, dtype=torch.float64), (index,), None, inputs.shape, "tensor"))


def norms(gram: torch.Tensor) -> torch.Tensor:
    """[groups, k] vector norms from a [groups, k, k] Gram matrix."""
    return gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()


def pair_coefficients(cos: torch.Tensor, t: float, linear: torch.Tensor) -> torch.Tensor:
    """[groups, 2] slerp coefficients (sin((1-t)θ)/sin θ, sin(tθ)/sin θ) for cos θ, or (1-t, t) where `linear`."""
    theta = torch.acos(torch.where(linear, 0.0, cos))
    sin_theta = torch.where(linear, 1.0, torch.sin(theta))
    c0 = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return torch.stack([c0, c1], dim=-1)


def _non_base_weights(inputs: MergeInputs) -> list[float]:
    return [inputs.per_input[i]["weight"] for i in inputs.non_base]


def _count_weighted(per_input: list[dict]) -> int:
    """How many inputs carry a non_base `weight`: the non-base models of one tensor."""
    return sum("weight" in p for p in per_input)


# -- slerp ----------------------------------------------------------------------------------------------------------
SLERP_DOT_THRESHOLD = 0.9995  # above this |cos| the arc is too flat for sin θ: plain lerp
SLERP_EPS = 1e-8  # a norm at or below this counts as 1 (a near-zero vector is not normalized)


def _slerp_statistics(inputs: MergeInputs) -> GramStatistics:
    """Exactly two models, the base and one other, each one vector (1-D tensors too): cos θ = <base, other> / norms
    (a norm <= 1e-8 counts as 1); out = sin((1-t)θ)/sin θ · base + sin(tθ)/sin θ · other, or the lerp (1-t)·base +
    t·other when |cos θ| > 0.9995. `t` is required and may be a layer gradient or a filter list."""
    base = inputs.base
    other = inputs.non_base[0]
    t = inputs.shared["t"]

    def finish(gram: torch.Tensor) -> Mix:
        n = norms(gram)
        n = torch.where(n > SLERP_EPS, n, 1.0)
        cos = (gram[:, 0, 1] / (n[:, 0] * n[:, 1])).clamp(-1, 1)
        return Mix(pair_coefficients(cos, t, cos.abs() > SLERP_DOT_THRESHOLD), (base, other), None, inputs.shape, "tensor")

    return GramStatistics((base, other), None, inputs.shape, "tensor", finish)


SLERP = MergeMethod(
    name="slerp",
    params=(Param("t", float, "shared"),),
    merge=apply_mix,
    base_model="required",
    min_inputs=2,
    max_inputs=2,
    statistics=_slerp_statistics,
    description="spherical interpolation from the base (t=0) to the other model (t=1)",
)


# -- nuslerp --------------------------------------------------------------------------------------------------------
NUSLERP_NORM_FLOOR = 1e-7  # norms are clamped to at least this before normalizing
NUSLERP_EPS = 1e-8  # colinear when 1 - cos² <= eps²


def nuslerp_grouping(shared: dict) -> Grouping:
    """mergekit: flatten (default) slerps the whole tensor and ignores row_wise; otherwise row_wise slerps along the
    first axis (each column of a matrix), else along the last axis (each row). 1-D tensors are always whole."""
    if shared["nuslerp_flatten"]:
        return "tensor"
    return "first_axis" if shared["nuslerp_row_wise"] else "last_axis"


def _nuslerp_statistics(inputs: MergeInputs) -> GramStatistics:
    """Two non-base models, t = w2 / (w1 + w2) (0.5 when the weights sum to ~0); with a base, slerp of the task vectors
    added to the base. Norms are floored at 1e-7 (a zero vector gets cos θ = 0); lerp only when exactly colinear."""
    if is_low_precision(inputs.dtype):
        return _nuslerp_low_precision_statistics(inputs)
    first, second = inputs.non_base
    weights = _non_base_weights(inputs)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    grouping = nuslerp_grouping(inputs.shared)

    def finish(gram: torch.Tensor) -> Mix:
        n = norms(gram).clamp_min(NUSLERP_NORM_FLOOR)
        cos = (gram[:, 0, 1] / (n[:, 0] * n[:, 1])).clamp(-1, 1)
        colinear = (1 - cos.square()) <= NUSLERP_EPS**2
        return Mix(pair_coefficients(cos, t, colinear), (first, second), inputs.base, inputs.shape, grouping)

    return GramStatistics((first, second), inputs.base, inputs.shape, grouping, finish)


def _nuslerp_vectors(block: MergeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The two vectors mergekit slerps, elementwise for a block: the models, or their task vectors (rounded)."""
    first, second = (block.tensors[i] for i in block.non_base)
    if block.base is None:
        return first, second
    base = block.tensors[block.base]
    return first - base, second - base


def _nuslerp_low_precision_statistics(inputs: MergeInputs) -> StagedSums:
    """mergekit's nuslerp in the dtype: pass 0 the two norms (rounded, clamped at 1e-7), pass 1 the dot of the
    normalized vectors (each quotient and product rounded); then cos, theta and the coefficients, each op rounded."""
    weights = _non_base_weights(inputs)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dtype = inputs.dtype

    def squares(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        return [v.to(torch.float32).square() for v in _nuslerp_vectors(block)]

    def norms_done(stats: StagedSums, totals: torch.Tensor) -> None:
        stats.values["norms"] = [round_norm(totals[i], dtype).clamp(min=NUSLERP_NORM_FLOOR) for i in range(2)]

    def products(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        v0, v1 = _nuslerp_vectors(block)
        n0, n1 = (stats.per_element(n, block) for n in stats.values["norms"])
        return [(v0 / n0) * (v1 / n1)]

    def cos_done(stats: StagedSums, totals: torch.Tensor) -> None:
        cos = round_total(totals[0], dtype).clamp(-1, 1)
        colinear = (1 - cos.square()) <= NUSLERP_EPS**2
        theta = torch.acos(torch.where(colinear, 0, cos))
        stats.values.update(
            t=t, colinear=colinear, sin_theta=torch.sin(theta), sin0=torch.sin((1 - t) * theta), sin1=torch.sin(t * theta)
        )

    stats = StagedSums(inputs.shape, nuslerp_grouping(inputs.shared), [squares, products], [norms_done, cos_done])
    if inputs.numel == 0:
        stats.stop()
    return stats


def nuslerp_low_precision_merge(inputs: MergeInputs) -> torch.Tensor:
    """`(sin((1-t)θ) v0 + sin(tθ) v1) / sin θ`, or `(1-t) v0 + t v1` where colinear, plus the base: ops in the dtype."""
    stats: StagedSums = inputs.stats
    v0, v1 = _nuslerp_vectors(inputs)
    if v0.numel() == 0:
        return v0.clone()
    t = stats.values["t"]
    at = lambda name: stats.per_element(stats.values[name], inputs)  # noqa: E731
    result = (at("sin0") * v0 + at("sin1") * v1) / at("sin_theta")
    result = torch.where(at("colinear"), (1 - t) * v0 + t * v1, result)
    return result if inputs.base is None else inputs.tensors[inputs.base] + result


def _nuslerp_merge(inputs: MergeInputs) -> torch.Tensor:
    if isinstance(inputs.stats, StagedSums):
        return nuslerp_low_precision_merge(inputs)
    return apply_mix(inputs)


def _check_nuslerp(shared: dict, per_input: list[dict]) -> None:
    count = _count_weighted(per_input)
    if count != 2:
        raise ValueError(f"nuslerp interpolates exactly two models besides the base, got {count}; list two models (base_model optional)")


NUSLERP = MergeMethod(
    name="nuslerp",
    params=(
        Param("weight", float, "non_base"),
        Param("nuslerp_row_wise", bool, "shared", False),
        Param("nuslerp_flatten", bool, "shared", True),
    ),
    merge=_nuslerp_merge,
    base_model="optional",
    min_inputs=2,
    max_inputs=3,
    statistics=_nuslerp_statistics,
    description="slerp of two models (or their task vectors) at t = w2 / (w1 + w2)",
    check=_check_nuslerp,
    low_precision_compute=True,  # mergekit computes it in the dtype; the *_low_precision_* functions round as it does
)


# -- multislerp -----------------------------------------------------------------------------------------------------
def multislerp_coefficients(gram: torch.Tensor, weights: torch.Tensor, eps: float, tensor: str) -> torch.Tensor:
    """Coefficients c with out = sum_i c_i v_i for one [k, k] Gram matrix of the vectors v_i (k >= 2).

    Unit vectors u_i = v_i / (|v_i| + eps); their weighted mean direction m; the weighted sum of the u_i projected on
    the tangent space at m, mapped back by the exponential map; times the weighted mean norm. Every vector involved is
    a combination of the v_i, so the arithmetic runs on coefficient vectors: <a, b> = a^T G b.
    """
    n = gram.diagonal().clamp_min(0).sqrt()
    inv = 1.0 / (n + eps)
    mean = weights * inv
    mean_norm = max(float(mean @ gram @ mean), 0.0) ** 0.5
    if mean_norm < eps:
        if len(weights) == 2:
            return weights.clone()  # mergekit's fallback: linear interpolation
        if float(n.max()) == 0.0:
            return torch.zeros_like(weights)  # every vector is zero: so is any mix (mergekit raises here)
        raise MergeEditError(
            f"tensor '{tensor}': multislerp: the weighted mean direction of the models is zero (opposite vectors whose "
            "weights cancel); change a weight"
        )
    mean = mean / mean_norm
    dots = inv * (gram @ mean)
    tangent = weights * inv - (weights * dots).sum() * mean
    tangent_norm = max(float(tangent @ gram @ tangent), 0.0) ** 0.5 + eps
    direction = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return direction * (n * weights).sum()


def _multislerp_statistics(inputs: MergeInputs):
    """One model: that model, unchanged. Otherwise multislerp_coefficients on the models (task vectors with a base).
    Differs from mergekit only where mergekit raises: when every task vector is zero the result is the base."""
    terms = tuple(inputs.non_base)
    if len(terms) == 1:
        return copy_of(inputs, terms[0])  # mergekit returns the one model itself, base or not
    if is_low_precision(inputs.dtype):
        return _multislerp_low_precision_statistics(inputs, terms)
    weights = torch.tensor(_non_base_weights(inputs), dtype=torch.float64)
    if inputs.shared["normalize_weights"]:
        weights = weights / weights.sum()
    eps = inputs.shared["eps"]

    def finish(gram: torch.Tensor) -> Mix:
        coefficients = multislerp_coefficients(gram[0], weights, eps, inputs.name)
        return Mix(coefficients.unsqueeze(0), terms, inputs.base, inputs.shape, "tensor")

    return GramStatistics(terms, inputs.base, inputs.shape, "tensor", finish)


def _multislerp_low_precision_statistics(inputs: MergeInputs, terms: tuple[int, ...]) -> StagedSums:
    """mergekit's multislerp in the dtype, in four passes: the task vectors' norms; the norm of the weighted mean of
    the unit vectors; each unit vector's dot with the normalized mean; the norm of the weighted tangent sum. Every
    elementwise op and every reduction rounds to the dtype as mergekit's does."""
    dtype = inputs.dtype
    eps = inputs.shared["eps"]
    weights = torch.tensor(_non_base_weights(inputs), dtype=dtype)
    if inputs.shared["normalize_weights"]:
        weights = weights / weights.sum()
    k = len(terms)

    def vectors(block: MergeInputs) -> list[torch.Tensor]:
        if block.base is None:
            return [block.tensors[i] for i in terms]
        return [block.tensors[i] - block.tensors[block.base] for i in terms]

    def units(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        return [v / stats.values["denominators"][i] for i, v in enumerate(vectors(block))]

    def mean(block: MergeInputs, stats: StagedSums) -> torch.Tensor:
        return float32_sum([u * weights[i] for i, u in enumerate(units(block, stats))])

    def tangent(block: MergeInputs, stats: StagedSums) -> torch.Tensor:
        m = mean(block, stats) / stats.values["mean_norm"]
        dots = stats.values["dots"]
        return float32_sum([(u - dots[i] * m) * weights[i] for i, u in enumerate(units(block, stats))])

    def squares(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        return [v.to(torch.float32).square() for v in vectors(block)]

    def norms_done(stats: StagedSums, totals: torch.Tensor) -> None:
        stats.values["norms"] = round_norm(totals[:, 0], dtype)
        stats.values["denominators"] = stats.values["norms"] + eps

    def mean_squares(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        return [mean(block, stats).to(torch.float32).square()]

    def mean_done(stats: StagedSums, totals: torch.Tensor) -> None:
        mean_norm = round_norm(totals[0, 0], dtype)
        stats.values["mean_norm"] = mean_norm
        if mean_norm < eps:
            if k == 2:
                stats.values["fallback"] = "linear"  # mergekit's linear interpolation
            elif float(stats.values["norms"].max()) == 0.0:
                stats.values["fallback"] = "zero"  # every vector is zero: so is any mix (mergekit raises here)
            else:
                raise MergeEditError(
                    f"tensor '{inputs.name}': multislerp: the weighted mean direction of the models is zero (opposite "
                    "vectors whose weights cancel); change a weight"
                )
            stats.stop(2)

    def dot_terms(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        m = mean(block, stats) / stats.values["mean_norm"]
        return [u * m for u in units(block, stats)]

    def dots_done(stats: StagedSums, totals: torch.Tensor) -> None:
        stats.values["dots"] = round_total(totals[:, 0], dtype)

    def tangent_squares(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        return [tangent(block, stats).to(torch.float32).square()]

    def tangent_done(stats: StagedSums, totals: torch.Tensor) -> None:
        tangent_norm = round_norm(totals[0, 0], dtype) + eps
        stats.values["cos"] = torch.cos(tangent_norm)
        stats.values["sin_ratio"] = torch.sin(tangent_norm) / tangent_norm
        stats.values["avg_norm"] = (stats.values["norms"] * weights).sum()

    def merge(block: MergeInputs) -> torch.Tensor:
        fallback = stats.values.get("fallback")
        if fallback == "linear":
            v0, v1 = vectors(block)
            result = v0 * weights[0] + v1 * weights[1]
        elif fallback == "zero":
            result = torch.zeros_like(block.tensors[terms[0]])
        else:
            m = mean(block, stats) / stats.values["mean_norm"]
            result = m * stats.values["cos"] + tangent(block, stats) * stats.values["sin_ratio"]
            result = result * stats.values["avg_norm"]
        return result if block.base is None else result + block.tensors[block.base]

    stats = StagedSums(
        inputs.shape, "tensor", [squares, mean_squares, dot_terms, tangent_squares], [norms_done, mean_done, dots_done, tangent_done]
    )
    stats.values["merge"] = merge
    if inputs.numel == 0:
        stats.values["fallback"] = "zero"
        stats.stop()
    return stats


def _staged_merge(inputs: MergeInputs) -> torch.Tensor:
    """multislerp and karcher: bf16/fp16 statistics (StagedSums) carry the merge that reads them; else the mix."""
    if isinstance(inputs.stats, StagedSums):
        return inputs.stats.values["merge"](inputs)
    return apply_mix(inputs)


def _check_multislerp(shared: dict, per_input: list[dict]) -> None:
    if _count_weighted(per_input) < 1:
        raise ValueError("multislerp needs at least one model besides the base; list more models")
    if shared["normalize_weights"] and sum(p["weight"] for p in per_input if "weight" in p) == 0:
        raise ValueError("weights sum to zero, so normalize_weights would divide by zero; change a weight or set normalize_weights: false")


MULTISLERP = MergeMethod(
    name="multislerp",
    params=(
        Param("weight", float, "non_base"),
        Param("normalize_weights", bool, "shared", True),
        Param("eps", float, "shared", 1e-8),
    ),
    merge=_staged_merge,
    base_model="optional",
    statistics=_multislerp_statistics,
    low_precision_compute=True,  # mergekit computes it in the dtype; the *_low_precision_* functions round as it does
    description="barycentric interpolation on the hypersphere (tangent space at the weighted mean direction)",
    check=_check_multislerp,
)


# -- karcher --------------------------------------------------------------------------------------------------------
def karcher_coefficients(gram: torch.Tensor, alphas: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Coefficients c with out = sum_i c_i x_i: the weighted Karcher (Riemannian) mean of the unit vectors times the
    weighted mean norm, for one [k, k] Gram matrix and weights `alphas` summing to 1.

    The mean direction always lies in the span of the unit vectors u_i, so it is iterated as a coefficient vector m
    (mean = sum_j m_j u_j) with <a, b> = a^T U b, U the Gram matrix of the u_i. Inputs with norm <= tol are left out of
    the mean (their norms still count in the scale); the iteration stops when the tangent step is shorter than tol.
    """
    n = gram.diagonal().clamp_min(0).sqrt()
    out = torch.zeros_like(alphas)
    valid = torch.nonzero(n > tol).flatten()
    beta = alphas[valid]
    if len(valid) == 0 or float(beta.sum()) <= 0:
        return out
    beta = beta / beta.sum()
    nv = n[valid]
    units = gram[valid][:, valid] / torch.outer(nv, nv)

    def length(c: torch.Tensor) -> float:
        return max(float(c @ units @ c), 0.0) ** 0.5

    mean = beta.clone()
    mean_norm = length(mean)
    if mean_norm < tol:
        mean = torch.zeros_like(beta)
        mean[0] = 1.0
    else:
        mean = mean / mean_norm
    eye = torch.eye(len(valid), dtype=torch.float64)
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1, 1)
        theta = torch.acos(dots)
        tangent = torch.zeros_like(mean)
        for j in range(len(valid)):
            if float(theta[j]) < tol:
                continue
            tangent += beta[j] * (theta[j] / torch.sin(theta[j])) * (eye[j] - dots[j] * mean)
        step = length(tangent)
        if step < tol:
            break
        mean = mean * math.cos(step) + tangent * (math.sin(step) / step)
        unit_norm = length(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = (alphas * n).sum()
    out[valid] = scale * mean / nv
    return out


def _karcher_statistics(inputs: MergeInputs):
    """Every input counts alike, a base_model included (mergekit ignores the base role here too).

    Difference from mergekit 0.1.5: mergekit ignores per-model weights (always alpha = 1/N); we honour `weight`
    (default 1.0, so equal weights give mergekit's result): alpha_i = w_i / sum w."""
    k = len(inputs.tensors)
    if k == 1:
        return copy_of(inputs, 0)
    if is_low_precision(inputs.dtype):
        return _karcher_low_precision_statistics(inputs)
    weights = torch.tensor([p["weight"] for p in inputs.per_input], dtype=torch.float64)
    alphas = weights / weights.sum()
    max_iter = int(inputs.shared["max_iter"])
    tol = inputs.shared["tol"]
    terms = tuple(range(k))

    def finish(gram: torch.Tensor) -> Mix:
        return Mix(karcher_coefficients(gram[0], alphas, max_iter, tol).unsqueeze(0), terms, None, inputs.shape, "tensor")

    return GramStatistics(terms, None, inputs.shape, "tensor", finish)


def _karcher_low_precision_statistics(inputs: MergeInputs) -> StagedSums:
    """mergekit's karcher with the inputs in bfloat16/float16: its norms are float32 (of the inputs cast to float32,
    the squares added in torch's order: torch_norm_passes, methods/norm_order.py); the unit vectors, the running mean,
    each dot product (torch.dot in the dtype), angle, tangent and update are rounded to the dtype op by op. Each whole-tensor reduction is a streamed pass: the norms, the initial mean's norm,
    then per iteration the dots, the tangent's norm and the new mean's norm (2 + 3 * iterations passes). The mean is
    never stored: each pass recomputes it elementwise from the inputs and the numbers of the passes before, so a
    tensor costs O(iterations^2) elementwise work (instead of a tensor-sized buffer outside the memory budget)."""
    dtype = inputs.dtype
    weights = [p["weight"] for p in inputs.per_input]
    alphas = [w / sum(weights) for w in weights]
    max_iter = int(inputs.shared["max_iter"])
    tol = inputs.shared["tol"]
    k = len(inputs.tensors)
    v: dict = {}

    def units(block: MergeInputs) -> dict[int, torch.Tensor]:
        return {i: (block.tensors[i] / v["norms"][i]).to(dtype) for i in v["valid"]}

    def walk(block: MergeInputs) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(mean, tangent, new mean) as far as the finished passes allow: the mean before the pending iteration, its
        tangent once its dots are known, the updated mean once the tangent's norm is known."""
        us = units(block)
        mean = torch.zeros_like(us[v["valid"][0]])
        for i in v["valid"]:
            mean += v["alphas"][i] * us[i]
        if "mean_norm" not in v:
            return mean, None, None
        mean = us[v["valid"][0]].clone() if v["mean_norm"].item() < tol else (mean / v["mean_norm"]).to(dtype)
        for rec in v["iters"]:
            tangent = torch.zeros_like(mean)
            for i, coef, dot in rec["terms"]:
                tangent += coef * (us[i] - dot * mean)
            if "tangent_norm" not in rec:
                return mean, tangent, None
            tn = rec["tangent_norm"]
            if tn.item() < tol:
                break
            new_mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(dtype)
            if "unit_norm" not in rec:
                return mean, tangent, new_mean
            mean = (new_mean / rec["unit_norm"]).to(dtype) if rec["unit_norm"].item() > tol else new_mean
        return mean, None, None

    def float32_norm(totals: torch.Tensor) -> torch.Tensor:
        return sqrt32(totals.to(torch.float32))  # torch.linalg.norm of a float32 tensor (a torch_norm_passes total)

    def input_squares(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        return [x.to(torch.float32).square() for x in block.tensors]

    def norms_done(stats: StagedSums, totals: torch.Tensor) -> None:
        v["norms"] = [float32_norm(totals[i, 0]) for i in range(k)]
        v["valid"] = [i for i in range(k) if v["norms"][i].item() > tol]
        v["scale"] = sum(alpha * norm for alpha, norm in zip(alphas, v["norms"]))
        if not v["valid"]:
            stats.stop(1)
            return
        valid_alphas = [alphas[i] for i in v["valid"]]
        alpha_sum = sum(valid_alphas)
        v["alphas"] = {i: a / alpha_sum for i, a in zip(v["valid"], valid_alphas)}
        v["iters"] = []
        add(mean_squares, mean_done)

    def mean_squares(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        return [walk(block)[0].to(torch.float32).square()]

    def mean_done(stats: StagedSums, totals: torch.Tensor) -> None:
        v["mean_norm"] = float32_norm(totals[0, 0])
        if max_iter > 0:
            add(dot_terms, dots_done)

    def dot_terms(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        mean = walk(block)[0].to(torch.float32)
        us = units(block)
        return [mean * us[i].to(torch.float32) for i in v["valid"]]  # exact products, as torch.dot's

    def dots_done(stats: StagedSums, totals: torch.Tensor) -> None:
        terms = []
        for j, i in enumerate(v["valid"]):
            dot = torch.clamp(round_total(totals[j, 0], dtype), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            terms.append((i, v["alphas"][i] * (theta / torch.sin(theta)), dot))
        v["iters"].append({"terms": terms})
        add(tangent_squares, tangent_done)

    def tangent_squares(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        return [walk(block)[1].to(torch.float32).square()]

    def tangent_done(stats: StagedSums, totals: torch.Tensor) -> None:
        v["iters"][-1]["tangent_norm"] = float32_norm(totals[0, 0])
        if v["iters"][-1]["tangent_norm"].item() >= tol:
            add(new_mean_squares, new_mean_done)

    def new_mean_squares(block: MergeInputs, stats: StagedSums) -> list[torch.Tensor]:
        return [walk(block)[2].to(torch.float32).square()]

    def new_mean_done(stats: StagedSums, totals: torch.Tensor) -> None:
        v["iters"][-1]["unit_norm"] = float32_norm(totals[0, 0])
        if len(v["iters"]) < max_iter:
            add(dot_terms, dots_done)

    def merge(block: MergeInputs) -> torch.Tensor:
        if not v.get("valid"):
            return torch.zeros_like(block.tensors[0])
        return v["scale"] * walk(block)[0]

    stats = StagedSums(inputs.shape, "tensor", [input_squares], [norms_done], torch_norm_passes={0})

    def add(stage, after) -> None:
        if stage is not dot_terms:  # every other pass is a float32 norm (torch's order); the dots are rounded
            stats.torch_norm_passes.add(len(stats.stages))
        stats.stages.append(stage)
        stats.after.append(after)
        stats.passes = len(stats.stages)

    stats.values["merge"] = merge
    if inputs.numel == 0:
        stats.stop()
    return stats


def _check_karcher(shared: dict, per_input: list[dict]) -> None:
    max_iter = shared["max_iter"]
    if max_iter < 0 or max_iter != int(max_iter):
        raise ValueError(f"max_iter must be a whole number >= 0, got {max_iter}")
    weights = [p["weight"] for p in per_input]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"karcher weights must be >= 0 with a positive sum, got {weights}; fix the models' weight")


KARCHER = MergeMethod(
    name="karcher",
    params=(
        Param("weight", float, "input", 1.0),
        Param("max_iter", float, "shared", 10.0),
        Param("tol", float, "shared", 1e-5),
    ),
    merge=_staged_merge,
    base_model="optional",
    statistics=_karcher_statistics,
    low_precision_compute=True,  # mergekit computes it in the dtype; the *_low_precision_* functions round as it does
    description="weighted Karcher (Riemannian) mean of the models' directions times their mean norm",
    check=_check_karcher,
)
