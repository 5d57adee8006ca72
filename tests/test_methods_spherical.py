"""slerp, nuslerp, multislerp, karcher and model_stock (mergeedit.merging.methods.spherical / model_stock / gram).

The methods compute coefficients from a streamed Gram matrix; the references here compute mergekit 0.1.5's formulas
directly on whole stacked tensors in float64, and small cases are worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_config
from method_harness import per_input_params, rand_models, run_blocked, run_whole, shared_params

from mergeedit.core.errors import MergeEditError
from mergeedit.merging.config import load_merge_config
from mergeedit.merging.methods import METHODS
from mergeedit.merging.methods.gram import group_count, group_ids
from mergeedit.merging.methods.model_stock import MODEL_STOCK
from mergeedit.merging.methods.spherical import KARCHER, MULTISLERP, NUSLERP, SLERP
from mergeedit.merging.plan import build_plan

R2 = math.sqrt(0.5)
F64 = torch.float64


def D(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def models64(n: int, numel: int, seed: int) -> list[torch.Tensor]:
    return [x.double() for x in rand_models(n, numel, seed)]


# -- references: mergekit's formulas on whole tensors ---------------------------------------------------------------
def slerp_ref(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x, y = a.double().flatten(), b.double().flatten()
    na, nb = x.norm(), y.norm()
    na = na if na > 1e-8 else 1.0
    nb = nb if nb > 1e-8 else 1.0
    dot = float(((x / na) * (y / nb)).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        out = (1 - t) * x + t * y
    else:
        th = math.acos(dot)
        out = (math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)
    return out.reshape(a.shape)


def nuslerp_pair_ref(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    th = torch.acos(torch.where(colinear, 0.0, cos))
    out = (torch.sin((1 - t) * th) * v0 + torch.sin(t * th) * v1) / torch.sin(th)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_ref(xs, base, w, row_wise=False, flatten=True):
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    if base is None:
        return nuslerp_pair_ref(t, xs[0], xs[1], row_wise, flatten)
    return base + nuslerp_pair_ref(t, xs[0] - base, xs[1] - base, row_wise, flatten)


def multislerp_ref(xs, base, w, normalize=True, eps=1e-8):
    if len(xs) == 1:
        return xs[0]
    v = torch.stack([x - base if base is not None else x for x in xs]).reshape(len(xs), -1)
    w = torch.tensor(w, dtype=F64)
    if normalize:
        w = w / w.sum()
    n = v.norm(dim=-1, keepdim=True)
    u = v / (n + eps)
    mean = (u * w.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    dots = (u * mean).sum(-1, keepdim=True)
    tangent = ((u - dots * mean) * w.view(-1, 1)).sum(0)
    tn = tangent.norm() + eps
    out = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (n.squeeze(-1) * w).sum()
    out = out.reshape(xs[0].shape)
    return out + base if base is not None else out


def karcher_ref(xs, alphas, max_iter=10, tol=1e-5):
    flat = [x.double().flatten() for x in xs]
    norms = [float(x.norm()) for x in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    beta = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    units = [flat[i] / norms[i] for i in valid]
    mean = sum(b * u for b, u in zip(beta, units))
    mean = units[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for b, u in zip(beta, units):
            dot = float(torch.dot(mean, u).clamp(-1, 1))
            th = math.acos(dot)
            if th < tol:
                continue
            tangent += b * (th / math.sin(th)) * (u - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return (sum(a * n for a, n in zip(alphas, norms)) * mean).reshape(xs[0].shape)


def model_stock_ref(base, xs, filter_wise=False):
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in xs]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in xs]
    offsets = [x - w0 for x in ws]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            prod = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            cos.append(((offsets[i] * offsets[j]).sum(-1) / prod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-6, 0.0, n * c / torch.where(den.abs() < 1e-6, 1.0, den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def both(method, tensors, base, shared, per_input, cuts):
    """(whole, blocked) results."""
    return run_whole(method, tensors, base, shared, per_input), run_blocked(method, tensors, base, shared, per_input, cuts)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= tol


# -- vector groups --------------------------------------------------------------------------------------------------
def test_group_ids_rows_and_columns():
    assert group_count((3, 4), "last_axis") == 3 and group_count((3, 4), "first_axis") == 4
    assert group_count((7,), "last_axis") == 1 and group_count((7,), "first_axis") == 1
    assert group_ids((3, 4), "last_axis", 6, 4).tolist() == [1, 1, 2, 2]
    assert group_ids((3, 4), "first_axis", 6, 4).tolist() == [2, 3, 0, 1]
    assert group_ids((2, 2, 3), "last_axis", 0, 12).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert group_ids((7,), "last_axis", 3, 2) is None and group_ids((3, 4), "tensor", 0, 12) is None


# -- slerp ----------------------------------------------------------------------------------------------------------
def test_slerp_orthogonal_unit_vectors_halfway():
    base, other = D(1, 0), D(0, 1)
    out = run_whole(SLERP, [base, other], 0, {"t": 0.5}, [{}, {}])
    assert close(out, D(R2, R2))
    # t = 1/3 of the 90 degree arc: (cos 30°, sin 30°); the base may be either input
    out = run_whole(SLERP, [other, base], 1, {"t": 1 / 3}, [{}, {}])
    assert close(out, D(math.sqrt(3) / 2, 0.5))


def test_slerp_keeps_norms_of_the_inputs_not_units():
    # |a| = 2, |b| = 3, 90 degrees: coefficients sin(θ/2)/sin θ = 1/sqrt(2) on the raw vectors
    out = run_whole(SLERP, [D(2, 0), D(0, 3)], 0, {"t": 0.5}, [{}, {}])
    assert close(out, D(2 * R2, 3 * R2))


def test_slerp_lerp_fallback_when_nearly_parallel_or_antiparallel():
    a = D(1, 2, 3)
    for b in (2 * a + D(0, 0, 1e-3), -3 * a):  # |cos| > 0.9995
        out = run_whole(SLERP, [a, b], 0, {"t": 0.25}, [{}, {}])
        assert close(out, 0.75 * a + 0.25 * b)


def test_slerp_zero_vector_no_nan():
    # a zero base counts as norm 1 -> cos 0 -> θ = 90 degrees: out = sin(t·π/2)·other
    out = run_whole(SLERP, [D(0, 0), D(3, 4)], 0, {"t": 0.5}, [{}, {}])
    assert close(out, D(3 * R2, 4 * R2))
    out = run_whole(SLERP, [D(0, 0), D(0, 0)], 0, {"t": 0.5}, [{}, {}])
    assert close(out, D(0, 0))


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.2])
def test_slerp_matches_reference_whole_and_blocked(t):
    base, other = (x.reshape(6, 5) for x in models64(1, 30, seed=1))
    whole, blocked = both(SLERP, [base, other], 0, {"t": t}, [{}, {}], cuts=[1, 7, 8, 29])
    assert close(whole, slerp_ref(t, base, other))
    assert close(blocked, whole)


def test_slerp_float32_blocked_equals_whole():
    base, other = rand_models(1, 1000, seed=2)
    whole, blocked = both(SLERP, [base, other], 0, {"t": 0.4}, [{}, {}], cuts=[3, 500, 999])
    assert close(blocked, whole, 1e-6)
    assert close(whole.double(), slerp_ref(0.4, base, other), 1e-6)


# -- nuslerp --------------------------------------------------------------------------------------------------------
def nu_shared(**kw):
    return shared_params(NUSLERP, **kw)


def test_nuslerp_t_from_weights():
    x0, x1 = D(1, 0), D(0, 1)
    # weights (1, 3): t = 3/4 -> angle 67.5 degrees from x0
    out = run_whole(NUSLERP, [x0, x1], None, nu_shared(), per_input_params(2, None, weight=[1.0, 3.0]))
    assert close(out, D(math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)))
    # weights summing to zero: t = 0.5
    out = run_whole(NUSLERP, [x0, x1], None, nu_shared(), per_input_params(2, None, weight=[1.0, -1.0]))
    assert close(out, D(R2, R2))


def test_nuslerp_with_base_slerps_task_vectors():
    base = D(10, 10)
    out = run_whole(NUSLERP, [base + D(1, 0), base, base + D(0, 1)], 1, nu_shared(), per_input_params(3, 1, weight=[1.0, 0, 1.0]))
    assert close(out, D(10 + R2, 10 + R2))


def test_nuslerp_rows_and_columns_by_hand():
    x0 = D(1, 0, 1, 0).reshape(2, 2)
    x1 = D(0, 1, 2, 0).reshape(2, 2)
    w = per_input_params(2, None, weight=[1.0, 1.0])
    # flatten false, row_wise false: each row. row 0 orthogonal -> (x0+x1)/sqrt2; row 1 colinear -> lerp
    rows = run_whole(NUSLERP, [x0, x1], None, nu_shared(nuslerp_flatten=False), w)
    assert close(rows, D(R2, R2, 1.5, 0).reshape(2, 2))
    # row_wise: each column. column 0 = (1,1) vs (0,2): 45 degrees, coefficient sin(π/8)/sin(π/4) on both;
    # column 1 = (0,0) vs (1,0): the zero vector gets cos 0, so 90 degrees: sin(π/4)·(1,0)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    cols = run_whole(NUSLERP, [x0, x1], None, nu_shared(nuslerp_flatten=False, nuslerp_row_wise=True), w)
    assert close(cols, D(c * 1, R2, c * 3, 0).reshape(2, 2))
    # flatten (the default) ignores row_wise
    flat = run_whole(NUSLERP, [x0, x1], None, nu_shared(nuslerp_row_wise=True), w)
    assert close(flat, nuslerp_ref([x0, x1], None, [1.0, 1.0]))


@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False), (True, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_reference_whole_and_blocked(row_wise, flatten, with_base):
    xs = [x.reshape(4, 6) for x in models64(2, 24, seed=3)]
    base = 0 if with_base else None
    tensors = xs if with_base else xs[1:]
    w = [0.0, 0.3, 0.9] if with_base else [0.3, 0.9]
    shared = nu_shared(nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    per_input = per_input_params(len(tensors), base, weight=w)
    expected = nuslerp_ref(xs[1:], xs[0] if with_base else None, [0.3, 0.9], row_wise, flatten)
    whole = run_whole(NUSLERP, tensors, base, shared, per_input)
    assert close(whole, expected)
    for cuts in ([5, 6, 13, 23], [6, 12, 18]):  # arbitrary and row-aligned cuts
        assert close(run_blocked(NUSLERP, tensors, base, shared, per_input, cuts), whole)


def test_nuslerp_one_dimensional_tensors_are_one_vector_in_every_mode():
    xs = models64(2, 9, seed=4)
    for row_wise, flatten in [(False, False), (True, False)]:
        out = run_blocked(NUSLERP, xs, 0, nu_shared(nuslerp_row_wise=row_wise, nuslerp_flatten=flatten),
                          per_input_params(3, 0, weight=[0, 1.0, 2.0]), cuts=[4])
        assert close(out, nuslerp_ref(xs[1:], xs[0], [1.0, 2.0]))


def test_nuslerp_zero_task_vectors_give_the_base():
    base = D(1, 2, 3)
    out = run_whole(NUSLERP, [base, base.clone(), base.clone()], 0, nu_shared(), per_input_params(3, 0, weight=[0, 1.0, 1.0]))
    assert close(out, base)


# -- multislerp -----------------------------------------------------------------------------------------------------
def ms_shared(**kw):
    return shared_params(MULTISLERP, **kw)


def test_multislerp_two_orthogonal_units_by_hand():
    out = run_whole(MULTISLERP, [D(1, 0), D(0, 1)], None, ms_shared(), per_input_params(2, None, weight=[1.0, 1.0]))
    assert close(out, D(R2, R2), 1e-7)  # eps = 1e-8 in the unit vectors shifts the result by ~1e-8


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_reference_whole_and_blocked(with_base, normalize):
    xs = [x.reshape(5, 4) for x in models64(3, 20, seed=5)]
    base = 0 if with_base else None
    tensors = xs if with_base else xs[1:]
    w = [0.5, 0.2, 0.3]
    per_input = per_input_params(len(tensors), base, weight=[0.0, *w] if with_base else w)
    shared = ms_shared(normalize_weights=normalize)
    whole, blocked = both(MULTISLERP, tensors, base, shared, per_input, cuts=[3, 11, 12])
    assert close(whole, multislerp_ref(xs[1:], xs[0] if with_base else None, w, normalize))
    assert close(blocked, whole)


def test_multislerp_single_model_is_copied_exactly():
    base, x = rand_models(1, 10, seed=6)
    out = run_whole(MULTISLERP, [base, x], 0, ms_shared(), per_input_params(2, 0, weight=[0, 0.3]))
    assert torch.equal(out, x)


def test_multislerp_zero_and_cancelling_task_vectors():
    base = D(1, 2)
    # every task vector zero: the base (mergekit raises here)
    same = [base, base.clone(), base.clone(), base.clone()]
    out = run_whole(MULTISLERP, same, 0, ms_shared(), per_input_params(4, 0, weight=[0, 1.0, 1.0, 1.0]))
    assert close(out, base)
    # two opposite task vectors with equal weights: mergekit's linear fallback, w1·d1 + w2·d2 = 0
    out = run_whole(MULTISLERP, [base, base + D(1, 0), base - D(1, 0)], 0, ms_shared(), per_input_params(3, 0, weight=[0, 1.0, 1.0]))
    assert close(out, base)
    # three vectors whose weighted directions cancel: no direction to interpolate around
    xs = [base, base + D(1, 0), base - D(0.5, 0), base - D(2, 0)]
    with pytest.raises(MergeEditError, match="tensor 't'.*weighted mean direction"):
        run_whole(MULTISLERP, xs, 0, ms_shared(), per_input_params(4, 0, weight=[0, 2.0, 1.0, 1.0]))


# -- karcher --------------------------------------------------------------------------------------------------------
def test_karcher_by_hand():
    e1, e2 = D(1, 0), D(0, 1)
    out = run_whole(KARCHER, [e1, e2], None, shared_params(KARCHER), [{}, {}])
    assert close(out, D(R2, R2))
    # weights 1:2 on the quarter circle: the mean sits at 2/3 of 90 degrees; scale = (1·1 + 2·1) / 3 = 1
    out = run_whole(KARCHER, [e1, e2], None, shared_params(KARCHER), [{"weight": 1.0}, {"weight": 2.0}])
    assert close(out, D(0.5, math.sqrt(3) / 2))
    # norms 2 and 4: the direction is unchanged, the scale is their mean, 3
    out = run_whole(KARCHER, [2 * e1, 4 * e2], None, shared_params(KARCHER), [{}, {}])
    assert close(out, D(3 * R2, 3 * R2))


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 0.0]])
def test_karcher_matches_reference_whole_and_blocked(weights):
    xs = [x.reshape(3, 7) for x in models64(3, 21, seed=7)]
    xs = [x * s for x, s in zip(xs, (1.0, -0.5, 2.0, 1.5))]  # spread the directions so it iterates
    alphas = [w / sum(weights) for w in weights]
    per_input = [{"weight": w} for w in weights]
    whole, blocked = both(KARCHER, xs, 0, shared_params(KARCHER), per_input, cuts=[2, 10, 20])
    assert close(whole, karcher_ref(xs, alphas), 1e-10)
    assert close(blocked, whole)
    few = run_whole(KARCHER, xs, None, shared_params(KARCHER, max_iter=1.0, tol=1e-3), per_input)
    assert close(few, karcher_ref(xs, alphas, max_iter=1, tol=1e-3), 1e-10)


def test_karcher_zero_vectors_and_single_input():
    e1, e2 = D(3, 0), D(0, 3)
    # a zero input is left out of the mean but its norm (0) counts in the scale: 3·(1/3 + 1/3)
    out = run_whole(KARCHER, [e1, D(0, 0), e2], None, shared_params(KARCHER), [{}, {}, {}])
    assert close(out, D(2 * R2, 2 * R2))
    out = run_whole(KARCHER, [D(0, 0), D(0, 0)], None, shared_params(KARCHER), [{}, {}])
    assert torch.equal(out, D(0, 0))
    x = rand_models(0, 5, seed=8)[0]
    assert torch.equal(run_whole(KARCHER, [x], None, shared_params(KARCHER), [{}]), x)


# -- model_stock ----------------------------------------------------------------------------------------------------
def test_model_stock_by_hand():
    base = D(0, 0)
    # task vectors (1,0) and (1,1): cos = 1/sqrt2, t = 2c/(1+c); out = t·mean = t·(1, 0.5)
    c = R2
    t = 2 * c / (1 + c)
    out = run_whole(MODEL_STOCK, [base, D(1, 0), D(1, 1)], 0, shared_params(MODEL_STOCK), [{}, {}, {}])
    assert close(out, D(t, t / 2))
    # orthogonal task vectors: cos 0, t = 0: the base
    out = run_whole(MODEL_STOCK, [D(5, 6), D(6, 6), D(5, 7)], 0, shared_params(MODEL_STOCK), [{}, {}, {}])
    assert close(out, D(5, 6))
    # opposite task vectors, N = 2: 1 + cos = 0 is singular, t = 0: the base
    out = run_whole(MODEL_STOCK, [D(5, 6), D(6, 6), D(4, 6)], 0, shared_params(MODEL_STOCK), [{}, {}, {}])
    assert close(out, D(5, 6))
    # zero task vectors: norms floored, cos 0: the base, no NaN
    out = run_whole(MODEL_STOCK, [D(5, 6), D(5, 6), D(5, 6)], 0, shared_params(MODEL_STOCK), [{}, {}, {}])
    assert close(out, D(5, 6))


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (30,), (2, 3, 5)])
def test_model_stock_matches_reference_whole_and_blocked(filter_wise, shape):
    xs = [x.reshape(shape) for x in models64(3, 30, seed=9)]
    shared = shared_params(MODEL_STOCK, filter_wise=filter_wise)
    expected = model_stock_ref(xs[0], xs[1:], filter_wise)
    whole = run_whole(MODEL_STOCK, xs, 0, shared, [{}] * 4)
    assert close(whole, expected)
    for cuts in ([1, 7, 8, 29], [5, 10, 15, 20, 25]):
        assert close(run_blocked(MODEL_STOCK, xs, 0, shared, [{}] * 4, cuts), whole)


# -- parameters and model counts ------------------------------------------------------------------------------------
def test_parameters_and_defaults_follow_mergekit():
    def spec(method):
        return {p.name: (p.scope, None if p.required else p.default) for p in method.params}

    assert spec(SLERP) == {"t": ("shared", None)}
    assert spec(NUSLERP) == {"weight": ("non_base", None), "nuslerp_row_wise": ("shared", False), "nuslerp_flatten": ("shared", True)}
    assert spec(MULTISLERP) == {"weight": ("non_base", None), "normalize_weights": ("shared", True), "eps": ("shared", 1e-8)}
    assert spec(KARCHER) == {"weight": ("input", 1.0), "max_iter": ("shared", 10.0), "tol": ("shared", 1e-5)}
    assert spec(MODEL_STOCK) == {"filter_wise": ("shared", False)}
    assert [METHODS[m].base_model for m in ("slerp", "nuslerp", "multislerp", "karcher", "model_stock")] == [
        "required", "optional", "optional", "optional", "required"]
    assert all(METHODS[m].elementwise for m in ("slerp", "nuslerp", "multislerp", "karcher", "model_stock"))


def test_plan_time_checks():
    with pytest.raises(ValueError, match="exactly two models"):
        NUSLERP.check(nu_shared(), [{}, {"weight": 1.0}, {"weight": 1.0}, {"weight": 1.0}])
    NUSLERP.check(nu_shared(), [{}, {"weight": 1.0}, {"weight": 1.0}])
    with pytest.raises(ValueError, match="at least one model besides the base"):
        MULTISLERP.check(ms_shared(), [{}])
    with pytest.raises(ValueError, match="sum to zero"):
        MULTISLERP.check(ms_shared(), [{"weight": 1.0}, {"weight": -1.0}])
    MULTISLERP.check(ms_shared(normalize_weights=False), [{"weight": 1.0}, {"weight": -1.0}])
    with pytest.raises(ValueError, match="karcher weights"):
        KARCHER.check(shared_params(KARCHER), [{"weight": 1.0}, {"weight": -1.0}])
    with pytest.raises(ValueError, match="max_iter"):
        KARCHER.check(shared_params(KARCHER, max_iter=2.5), [{"weight": 1.0}])


def _plan(tmp_path, text: str):
    config, doc = load_merge_config(write_config(tmp_path, text))
    return build_plan(config, doc)


@pytest.mark.parametrize("text,needle", [
    ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.5}}\n", "at most 2 input"),
    ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\nparameters: {{t: 0.5}}\n", "at least 2 inputs"),
    ("merge_method: slerp\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.5}}\n", "needs a base model"),
    ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\n", "needs parameter 't'"),
    ("merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n", "at least 3 inputs"),
    ("merge_method: nuslerp\nmodels:\n" + "".join(f"  - model: {{{m}}}\n    parameters: {{{{weight: 1}}}}\n" for m in "abc"),
     "exactly two models"),
])
def test_wrong_model_counts_are_plan_errors(tmp_path, models, text, needle):
    with pytest.raises(MergeEditError, match=needle):
        _plan(tmp_path, text.format(**{k: str(v) for k, v in models.items()}))


def test_slerp_t_gradient_and_filters_resolve_per_layer(tmp_path, models):
    text = (
        f"merge_method: slerp\nbase_model: {models['base']}\nmodels:\n  - model: {models['base']}\n  - model: {models['a']}\n"
        "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 1]\n    - value: 0.25\n"
    )
    plan = _plan(tmp_path, text)
    t = {p.name: p.shared["t"] for p in plan.tensors}
    assert [t[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(3)] == [0.0, 0.5, 1.0]
    assert t["model.layers.1.mlp.up_proj.weight"] == 0.25 and t["model.embed_tokens.weight"] == 0.25
