"""Unit tests for breadcrumbs, breadcrumbs_ties, della, della_linear and sce, driven the way the executor drives them.

Expected numbers are worked out by hand (literals) or come from plain stacked-tensor references of mergekit 0.1.5's
formulas written here (argsort-based band and ranks, torch.topk on variances), never from the code under test. The
DELLA reference draws its Bernoulli noise from the package's positional noise (as test_methods does for DARE).
"""

from __future__ import annotations

import pytest
import torch
from method_harness import T, per_input_params, rand_models, run_blocked, run_whole, shared_params, tie_free_models

from mergeedit.core.errors import MergeEditError
from mergeedit.merging.methods import METHODS, MergeInputs, get_method, seeded_random, sparsify
from mergeedit.merging.methods.sce import SCE, SceStatistics
from mergeedit.merging.methods.seeded_random import derive_seed, seeded_uniform
from mergeedit.merging.methods.sparsify import (
    BREADCRUMBS,
    BREADCRUMBS_TIES,
    DELLA,
    DELLA_LINEAR,
    breadcrumb_counts,
    rank_keep_probability,
    row_length,
)
from mergeedit.merging.methods.task_arithmetic import RESCALE_EPS

# ----------------------------------------------------------------------------------------------------------------------
# Plain references
# ----------------------------------------------------------------------------------------------------------------------


def ref_band_mask(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers, written plainly: sort ascending, keep positions n_bot .. n_bot + target."""
    n = d.numel()
    target, top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - top)
    mask = torch.zeros(n, dtype=d.dtype)
    mask[torch.argsort(d.abs().reshape(-1), stable=True)[n_bot : n_bot + target]] = 1
    return mask.view(d.shape)


def ref_della_mask(d: torch.Tensor, density: float, epsilon: float, seed: int, model_index: int) -> torch.Tensor:
    """argsort-of-argsort ranks per row (1-D = one row), p = density - eps + 2 eps rank/(cols-1), positional noise."""
    rows = d.reshape(1, -1) if d.dim() < 2 else d.reshape(d.shape[0], -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).double()
    p = (density - epsilon) + ranks / (rows.shape[1] - 1) * 2 * epsilon
    noise = seeded_uniform(derive_seed(seed, "della", model_index), 0, d.numel()).view(rows.shape).double()
    return (noise < p).to(d.dtype).view(d.shape)


def ref_family(tensors, base, shared, per_input, mask_of, consensus):
    """delta * mask, L1 rescale, weights, sum-sign election over weighted deltas, normalize, lambda (mergekit GTA)."""
    b = tensors[base]
    non_base = [i for i in range(len(tensors)) if i != base]
    deltas = []
    for i in non_base:
        d = tensors[i] - b
        density = per_input[i].get("density", 1.0)
        if density < 1:
            masked = d * mask_of(d, i) if density > 0 else torch.zeros_like(d)
            if shared["rescale"]:
                before, after = d.abs().sum(), masked.abs().sum()
                if before >= RESCALE_EPS and after >= RESCALE_EPS:
                    masked = masked * (before / after)
            d = masked
        deltas.append(d)
    weights = torch.tensor([per_input[i]["weight"] for i in non_base], dtype=b.dtype).view(-1, *[1] * b.dim())
    stacked = torch.stack(deltas) * weights
    if consensus:
        mask = stacked.sign() == (stacked.sum(0) >= 0).to(b.dtype) * 2 - 1
        mixed, divisor = (stacked * mask).sum(0), (weights * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = stacked.sum(0), weights.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if shared["normalize"]:
        mixed = mixed / divisor
    return b + mixed * shared["lambda"]


def ref_sce(tensors, base, select_topk):
    """mergekit's sce: torch.topk on population variances, mean-square weights, sum-sign erase, weighted average."""
    b = tensors[base]
    tvs = torch.stack([x - b for i, x in enumerate(tensors) if i != base])
    if select_topk < 1:
        var = tvs.var(dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        mask = torch.zeros(var.numel(), dtype=b.dtype)
        if select_topk > 0 and k:
            mask[torch.topk(var.reshape(-1), k).indices] = 1
        tvs = tvs * mask.view(var.shape)
    erase = tvs.sign() == (tvs.sum(0) >= 0).to(b.dtype) * 2 - 1
    w = tvs.square().reshape(tvs.shape[0], -1).mean(1)
    w = torch.full_like(w, 1 / w.numel()) if abs(float(w.sum())) < 1e-6 else w / w.sum()
    ew = w.view(-1, *[1] * b.dim()) * erase
    return b + (tvs * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


def _per_input_full(method, n, base, **lists):
    """per_input with the method's non_base defaults filled in (the reference reads them)."""
    out = per_input_params(n, base, **lists)
    for i, d in enumerate(out):
        if i != base:
            for p in method.params:
                if p.scope == "non_base" and p.name not in d:
                    d[p.name] = p.default
    return out


def _single(method, delta, seed=0, **params):
    """base 0, one model with weight 1: the merge returns the sparsified (and maybe rescaled) delta itself."""
    base = torch.zeros_like(delta)
    pi = per_input_params(2, 0, **{k: [None, v] for k, v in {"weight": 1.0, **params}.items()})
    return run_whole(method, [base, delta], 0, shared_params(method), pi, seed=seed)


# ----------------------------------------------------------------------------------------------------------------------
# Registry and declared parameters
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,normalize,rescale,extra,elementwise,randomized",
    [
        (BREADCRUMBS, False, False, ("gamma", 0.01), True, False),
        (BREADCRUMBS_TIES, False, False, ("gamma", 0.01), True, False),
        (DELLA, True, True, ("epsilon", 0.15), False, True),
        (DELLA_LINEAR, False, True, ("epsilon", 0.15), False, True),
    ],
)
def test_family_defaults_match_mergekit(method, normalize, rescale, extra, elementwise, randomized):
    assert METHODS[method.name] is method and get_method(method.name, "cfg.yaml") is method
    assert method.param("normalize").default is normalize
    assert method.param("rescale").default is rescale
    assert method.param("lambda").default == 1.0 and method.param("int8_mask").default is False
    assert method.param("weight").required and method.param("weight").scope == "non_base"
    assert method.param("density").default == 1.0 and method.param("density").scope == "non_base"
    name, default = extra
    assert method.param(name).default == default and method.param(name).scope == "non_base"
    assert [p.name for p in method.params] == ["int8_mask", "normalize", "rescale", "lambda", "weight", "density", name]
    assert method.base_model == "required"
    assert method.elementwise is elementwise and method.randomized is randomized


def test_sce_declared_params():
    assert METHODS["sce"] is SCE
    assert [(p.name, p.scope, p.default) for p in SCE.params] == [("int8_mask", "shared", False), ("select_topk", "shared", 1.0)]
    assert SCE.base_model == "required" and SCE.elementwise and not SCE.randomized


# ----------------------------------------------------------------------------------------------------------------------
# breadcrumbs / breadcrumbs_ties
# ----------------------------------------------------------------------------------------------------------------------

# |delta| = 1..10 in a scrambled order, mixed signs
TEN = T(3.0, -10.0, 7.0, 1.0, -6.0, 9.0, -2.0, 5.0, -8.0, 4.0)


@pytest.mark.parametrize(
    "density,gamma,survivors",
    [
        (0.5, 0.1, {9, 8, 7, 6, 5}),  # skip the top 1 (the 10), keep the next 5
        (0.5, 0.01, {10, 9, 8, 7, 6}),  # int(0.1) = 0 outliers dropped: the top 5 (mergekit before its fix zeroed all)
        (0.5, 0.3, {7, 6, 5, 4, 3}),  # skip 3
        (0.5, 0.8, {5, 4, 3, 2, 1}),  # skip reduced to 5 so that 5 remain: the smallest
        (0.3, 0.2, {8, 7, 6}),
        (0.05, 0.1, set()),  # int(0.5) = 0 kept (mergekit keeps no minimum of one here)
    ],
)
def test_breadcrumbs_by_hand_ten_elements(density, gamma, survivors):
    out = _single(BREADCRUMBS, TEN, density=density, gamma=gamma)
    expected = torch.where(torch.isin(TEN.abs(), T(*survivors) if survivors else T(-1.0)), TEN, 0.0)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("density,gamma,numel,counts", [(0.5, 0.1, 10, (1, 5)), (0.5, 0.01, 10, (0, 5)), (0.5, 0.8, 10, (5, 5)),
                                                          (0.9, 0.01, 4096, (40, 3686)), (0.0, 0.1, 10, (1, 0))])
def test_breadcrumb_counts(density, gamma, numel, counts):
    assert breadcrumb_counts(density, gamma, numel) == counts


def test_breadcrumbs_small_norm_tensor_keeps_its_top_entries():
    # A 64-element norm delta with the default gamma 0.01: int(0.64) = 0 outliers. mergekit's old slice
    # sorted[n_bot:-0] was empty and zeroed the whole delta; we keep the 32 largest.
    delta = torch.randperm(64, generator=torch.Generator().manual_seed(0)).float() + 1
    out = _single(BREADCRUMBS, delta, density=0.5)
    assert torch.equal(out, torch.where(delta > 32, delta, 0.0))


def test_breadcrumbs_density_one_keeps_everything_even_outliers():
    assert torch.equal(_single(BREADCRUMBS, TEN, density=1.0, gamma=0.5), TEN)


def test_breadcrumbs_rescale_by_hand():
    # density 0.5, gamma 0.1: kept |.| = 9+8+7+6+5 = 35 of 55, so the kept entries are scaled by 55/35
    base = torch.zeros(10)
    pi = per_input_params(2, 0, weight=[None, 1.0], density=[None, 0.5], gamma=[None, 0.1])
    out = run_whole(BREADCRUMBS, [base, TEN], 0, shared_params(BREADCRUMBS, rescale=True), pi)
    expected = torch.where(torch.isin(TEN.abs(), T(9, 8, 7, 6, 5)), TEN * (55 / 35), 0.0)
    assert torch.allclose(out, expected, atol=1e-6)


def test_breadcrumbs_ties_by_hand():
    # base 1; model a: delta [4, -3, 2, 1], b: delta [-1, 2, -5, 3]; density 0.5, gamma 0.25 (skip 1, keep 2)
    # a keeps |3|,|2| -> [0, -3, 2, 0]; b keeps |3|,|2| -> [0, 2, 0, 3]; weights 1 and 0.5 -> [0,-3,2,0] + [0,1,0,1.5]
    # election on the weighted sum [0, -2, 2, 1.5]: + - + + ; agreeing: pos1 only a, pos2 only a, pos3 only b
    base = torch.ones(4)
    xs = [base, base + T(4, -3, 2, 1), base + T(-1, 2, -5, 3)]
    pi = per_input_params(3, 0, weight=[None, 1.0, 0.5], density=[None, 0.5, 0.5], gamma=[None, 0.25, 0.25])
    out = run_whole(BREADCRUMBS_TIES, xs, 0, shared_params(BREADCRUMBS_TIES), pi)
    assert torch.equal(out, base + T(0, -3, 2, 1.5))
    normalized = run_whole(BREADCRUMBS_TIES, xs, 0, shared_params(BREADCRUMBS_TIES, normalize=True), pi)
    assert torch.equal(normalized, base + T(0, -3, 2, 3))  # each divided by the weight that contributed


@pytest.mark.parametrize("method,consensus", [(BREADCRUMBS, False), (BREADCRUMBS_TIES, True)])
@pytest.mark.parametrize("overrides", [{}, {"rescale": True}, {"normalize": True, "lambda": 0.5}])
def test_breadcrumbs_matches_argsort_reference(method, consensus, overrides):
    xs = [x.view(40, 25) for x in tie_free_models(3, 1000, seed=3)]
    pi = _per_input_full(method, 4, 0, weight=[None, 0.75, 0.5, -0.25], density=[None, 0.3, 0.6, 0.05],
                         gamma=[None, 0.01, 0.2, 0.0])
    shared = shared_params(method, **overrides)
    out = run_whole(method, xs, 0, shared, pi)
    ref = ref_family(xs, 0, shared, pi, lambda d, i: ref_band_mask(d, pi[i]["density"], pi[i]["gamma"]), consensus)
    assert torch.allclose(out, ref, atol=1e-6)
    # the kept count per model is exactly int(density * n)
    d = _single(method, xs[1].reshape(-1) - xs[0].reshape(-1), density=0.3, gamma=0.01)
    assert int((d != 0).sum()) == 300


def test_breadcrumbs_check_rejects_gamma_outside_unit_interval():
    with pytest.raises(ValueError, match="gamma 1.5"):
        BREADCRUMBS.check({}, [{}, {"density": 0.5, "gamma": 1.5}])
    BREADCRUMBS.check({}, [{}, {"density": 0.5, "gamma": 0.0}])


# ----------------------------------------------------------------------------------------------------------------------
# della / della_linear
# ----------------------------------------------------------------------------------------------------------------------


def test_rank_keep_probability_by_hand():
    # row [3, -1, 2]: ranks 2, 0, 1 of 3 -> p = 0.4 + 0.2 * rank / 2; a tie [5, 5] ranks by column
    p = rank_keep_probability(T(3, -1, 2).abs().view(1, 3), 0.5, 0.1)
    assert torch.allclose(p, T(0.6, 0.4, 0.5).view(1, 3))
    assert torch.allclose(rank_keep_probability(T(5, 5).view(1, 2), 0.5, 0.1), T(0.4, 0.6).view(1, 2))
    assert torch.equal(rank_keep_probability(T(7, 1).view(2, 1), 0.3, 0.1), T(0.3, 0.3).view(2, 1))


def test_row_length():
    assert row_length((6, 10)) == 10 and row_length((4, 3, 5)) == 15 and row_length((32,)) == 32 and row_length(()) == 1


@pytest.mark.parametrize("method,consensus", [(DELLA, True), (DELLA_LINEAR, False)])
@pytest.mark.parametrize("overrides", [{}, {"rescale": False}, {"normalize": True, "lambda": 0.7}])
def test_della_matches_reference(method, consensus, overrides):
    xs = [x.view(20, 50) for x in rand_models(3, 1000, seed=8)]
    pi = _per_input_full(method, 4, 0, weight=[None, 0.9, 0.4, 0.6], density=[None, 0.3, 0.5, 1.0],
                         epsilon=[None, 0.15, 0.05, 0.15])
    shared = shared_params(method, **overrides)
    out = run_whole(method, xs, 0, shared, pi, seed=99)
    ref = ref_family(xs, 0, shared, pi, lambda d, i: ref_della_mask(d, pi[i]["density"], pi[i]["epsilon"], 99, i), consensus)
    assert torch.allclose(out, ref, atol=1e-5)


def test_della_one_dimensional_tensor_is_one_row():
    delta = torch.randn(500, generator=torch.Generator().manual_seed(4))
    out = _single(DELLA_LINEAR, delta, seed=5, density=0.4)
    kept = ref_della_mask(delta, 0.4, 0.15, 5, 1)
    assert torch.allclose(out, delta * kept * (delta.abs().sum() / (delta * kept).abs().sum()), atol=1e-5)


def test_della_kept_fraction_follows_density_and_rank():
    rows, cols = 200, 500
    delta = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    out = _single(DELLA_LINEAR, delta, seed=3, density=0.4, epsilon=0.15)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.01
    order = torch.argsort(delta.abs(), dim=1)
    smallest = kept.gather(1, order[:, :50]).float().mean().item()  # p from 0.25 to 0.28
    largest = kept.gather(1, order[:, -50:]).float().mean().item()  # p from 0.52 to 0.55
    assert 0.22 < smallest < 0.30 and 0.50 < largest < 0.58


def test_della_rescale_preserves_l1_norm_not_one_over_p():
    delta = torch.randn(30, 40, generator=torch.Generator().manual_seed(6))
    out = _single(DELLA_LINEAR, delta, seed=2, density=0.3, epsilon=0.1)
    assert torch.allclose(out.abs().sum(), delta.abs().sum(), rtol=1e-5)
    kept = out != 0
    factor = out[kept] / delta[kept]
    assert torch.allclose(factor, factor[0].expand_as(factor)) and abs(factor[0].item() - 1 / 0.3) > 0.01


def test_della_same_seed_same_bytes_different_seed_differs():
    xs = [x.view(25, 40) for x in rand_models(2, 1000, seed=2)]
    pi = per_input_params(3, 0, weight=[None, 0.6, 0.4], density=[None, 0.5, 0.5])
    shared = shared_params(DELLA)
    a = run_whole(DELLA, xs, 0, shared, pi, seed=11)
    assert torch.equal(a, run_whole(DELLA, xs, 0, shared, pi, seed=11))
    b = run_whole(DELLA, xs, 0, shared, pi, seed=12)
    assert not torch.equal(a, b)
    assert torch.equal(a, run_whole(DELLA, xs, 0, shared, pi, seed=11, name="other"))  # seed already names the tensor


def test_della_density_edges():
    delta = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_single(DELLA, delta, density=1.0), delta)
    assert torch.equal(_single(DELLA, delta, density=0.0), torch.zeros_like(delta))


def test_della_check_rejects_probabilities_outside_unit_interval():
    with pytest.raises(ValueError, match="density 0.1 \\+/- epsilon 0.15"):
        DELLA.check({}, [{}, {"density": 0.1, "epsilon": 0.15}])
    with pytest.raises(ValueError):
        DELLA_LINEAR.check({}, [{}, {"density": 0.9, "epsilon": 0.1}])
    DELLA.check({}, [{}, {"density": 1.0, "epsilon": 0.15}, {"density": 0.5, "epsilon": 0.0}])  # density 1: unused


def test_della_chunk_cutting_a_row_is_an_error():
    xs = [x.view(10, 10) for x in rand_models(1, 100, seed=0)]
    pi = per_input_params(2, 0, weight=[None, 1.0], density=[None, 0.5])
    with pytest.raises(MergeEditError, match="cuts a row of 10 elements"):
        run_blocked(DELLA, xs, 0, shared_params(DELLA), pi, [15])


# ----------------------------------------------------------------------------------------------------------------------
# sce
# ----------------------------------------------------------------------------------------------------------------------


def test_sce_by_hand():
    # tau1 = [1, -2, 2], tau2 = [3, 2, -1]: mean squares 3 and 14/3 -> weights 9/23, 14/23; sums [4, 0, 1] all elect +
    base = T(1, 1, 1)
    xs = [base, base + T(1, -2, 2), base + T(3, 2, -1)]
    out = run_whole(SCE, xs, 0, shared_params(SCE), per_input_params(3, 0))
    assert torch.allclose(out, base + T(51 / 23, 2, 2))
    # select_topk 0.5: variances [1, 4, 2.25], 3 nonzero, k = 1: only position 1 survives; equal weights; tau2 agrees
    out = run_whole(SCE, xs, 0, shared_params(SCE, select_topk=0.5), per_input_params(3, 0))
    assert torch.equal(out, base + T(0, 2, 0))


def test_sce_select_nothing_and_identical_models_return_base():
    base = T(1, 2, 3)
    xs = [base, base + T(1, -2, 2), base + T(3, 2, -1)]
    assert torch.equal(run_whole(SCE, xs, 0, shared_params(SCE, select_topk=0.0), per_input_params(3, 0)), base)
    assert torch.equal(run_whole(SCE, xs, 0, shared_params(SCE, select_topk=0.2), per_input_params(3, 0)), base)  # k=0
    same = [base, base.clone(), base.clone()]
    assert torch.equal(run_whole(SCE, same, 0, shared_params(SCE, select_topk=0.5), per_input_params(3, 0)), base)


def test_sce_topk_count_rounds_in_float32_like_mergekit():
    # 90 positions with distinct nonzero variances: int(90 * 0.7) is 62 in float64 but mergekit's tensor product gives 63
    base = torch.zeros(90)
    xs = [base, torch.arange(1, 91, dtype=torch.float32), -torch.arange(1, 91, dtype=torch.float32)]
    inputs = MergeInputs("t", xs, 0, {"select_topk": 0.7}, [{}, {}, {}], 0, 90, 0, shape=(90,))
    stats = SceStatistics(0.7, 2, 90)
    for p in range(stats.passes):
        stats.observe(p, inputs)
        stats.end_pass(p)
    assert stats.select.k == 63
    kept = stats.apply_selection(torch.stack([xs[1], xs[2]]), 0)[0] != 0
    assert torch.equal(kept, torch.arange(90) >= 27)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.93])
def test_sce_matches_reference(topk):
    xs = [x.view(40, 25) for x in rand_models(3, 1000, seed=17)]
    xs.insert(1, xs.pop(0))  # base in the middle
    out = run_whole(SCE, xs, 1, shared_params(SCE, select_topk=topk), per_input_params(4, 1))
    assert torch.allclose(out, ref_sce(xs, 1, topk), atol=1e-6)


def test_sce_only_base_returns_copy():
    base = T(1, 2)
    out = run_whole(SCE, [base], 0, shared_params(SCE), [{}])
    assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()


# ----------------------------------------------------------------------------------------------------------------------
# Every method: blocked == whole, inputs untouched
# ----------------------------------------------------------------------------------------------------------------------

ELEMENTWISE_CUTS = [[1], [333, 334, 999], list(range(37, 1000, 37))]
ROW_CUTS = [[25], [25, 50, 500], list(range(25, 1000, 75))]  # 40 rows of 25 elements: cut at row boundaries only


@pytest.mark.parametrize(
    "method,overrides,cuts",
    [(m, o, c) for m, o in ((BREADCRUMBS, {}), (BREADCRUMBS_TIES, {"rescale": True, "normalize": True}),
                            (SCE, {"select_topk": 0.3}), (SCE, {})) for c in ELEMENTWISE_CUTS]
    + [(m, o, c) for m, o in ((DELLA, {}), (DELLA_LINEAR, {}), (DELLA, {"rescale": False})) for c in ROW_CUTS],
    ids=lambda v: getattr(v, "name", None) or str(v)[:20],
)
def test_blocked_equals_whole(method, overrides, cuts):
    xs = [x.view(40, 25) for x in rand_models(3, 1000, seed=21)]
    xs.insert(2, xs.pop(0))  # base at index 2
    pi = per_input_params(4, 2, weight=[0.9, 0.4, None, 1.2], density=[0.3, 0.55, None, 0.8])
    if method is SCE:
        pi = per_input_params(4, 2)
    shared = shared_params(method, **overrides)
    assert torch.equal(run_whole(method, xs, 2, shared, pi, seed=5), run_blocked(method, xs, 2, shared, pi, cuts, seed=5))


@pytest.mark.parametrize("method", [DELLA, DELLA_LINEAR])
def test_della_blocked_equals_whole_across_noise_blocks_and_row_groups(method, monkeypatch):
    # noise key spans and the row groups of a chunk shrunk to 96 elements: groups of 3 rows of 25 straddle the spans
    monkeypatch.setattr(seeded_random, "SPAN", 96)
    monkeypatch.setattr(sparsify, "ROW_GROUP", 96)
    xs = [x.view(40, 25) for x in rand_models(2, 1000, seed=5)]
    pi = _per_input_full(method, 3, 0, weight=[None, 0.8, 0.6], density=[None, 0.4, 0.6])
    shared = shared_params(method)
    whole = run_whole(method, xs, 0, shared, pi, seed=77)
    for cuts in ([500], [75, 100, 900], list(range(25, 1000, 25))):
        assert torch.equal(whole, run_blocked(method, xs, 0, shared, pi, cuts, seed=77))
    ref = ref_family(xs, 0, shared, pi, lambda d, i: ref_della_mask(d, pi[i]["density"], pi[i]["epsilon"], 77, i), method is DELLA)
    assert torch.allclose(whole, ref, atol=1e-5)


@pytest.mark.parametrize("method", [BREADCRUMBS, BREADCRUMBS_TIES, DELLA, DELLA_LINEAR, SCE])
def test_inputs_untouched(method):
    xs = [x.view(10, 10) for x in rand_models(2, 100, seed=9)]
    before = [x.clone() for x in xs]
    pi = per_input_params(3, 0) if method is SCE else per_input_params(3, 0, weight=[None, 0.5, 0.7], density=[None, 0.5, 0.5])
    run_whole(method, xs, 0, shared_params(method, **({"select_topk": 0.5} if method is SCE else {})), pi, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(xs, before))


# ----------------------------------------------------------------------------------------------------------------------
# Through the executor: row chunks under a tiny budget give the same bytes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,params,shared", [
    ("della", "{weight: 0.6, density: 0.4}", "{}"),
    ("breadcrumbs_ties", "{weight: 0.6, density: 0.4, gamma: 0.05}", "{}"),
    ("sce", "{}", "{select_topk: 0.4}"),
])
def test_chunked_merge_equals_whole_merge(tmp_path, models, run_cli, method, params, shared):
    from conftest import write_config

    cfg = write_config(tmp_path, f"""
merge_method: {method}
base_model: {models['base']}
models:
  - model: {models['base']}
  - model: {models['a']}
    parameters: {params}
  - model: {models['b']}
    parameters: {params}
parameters: {shared}
""")
    assert run_cli("merge", cfg, tmp_path / "whole", "--random-seed", "3").code == 0
    assert "row chunks" in run_cli("merge", cfg, tmp_path / "chunked", "--memory-budget", "10K", "--dry-run").stdout
    assert run_cli("merge", cfg, tmp_path / "chunked", "--random-seed", "3", "--memory-budget", "10K").code == 0
    read = lambda folder: {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}  # noqa: E731
    assert read(tmp_path / "whole") == read(tmp_path / "chunked")


def test_della_bad_epsilon_is_a_one_line_cli_error(tmp_path, models, run_cli):
    from conftest import write_config

    cfg = write_config(tmp_path, f"""
merge_method: della
base_model: {models['base']}
models:
  - model: {models['a']}
    parameters: {{weight: 1.0, density: 0.1}}
""")
    result = run_cli("merge", cfg, tmp_path / "out")
    assert result.code == 2 and "Traceback" not in result.stderr
    assert "density 0.1 +/- epsilon 0.15" in result.stderr and "lower epsilon" in result.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_breadcrumbs_keep_exactly_their_counts_through_tie_groups(dtype):
    """200k entries whose magnitudes take 64 values, so both boundaries (the gamma outliers dropped from the top, then
    `density` kept) fall inside big groups of equal magnitudes. As mergekit, exactly int(gamma * n) are dropped from
    the top and int(density * n) kept after them; tied magnitudes rank as mergekit's ascending sort ranks them
    (sort(|x|).indices[n_bot : n_bot + keep]), the same whole and cut at odd places."""
    g = torch.Generator().manual_seed(4)
    n, density, gamma = 200_000, 0.4, 0.05
    levels = torch.randint(1, 65, (n,), generator=g).to(torch.float32) / 64
    x = (levels * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)).to(dtype)
    base = torch.zeros(n, dtype=dtype)
    mags = x.abs().float()
    order = torch.sort(mags, descending=True, stable=True).indices
    skip, keep = int(gamma * n), int(density * n)
    ranked = mags[order]
    assert ranked[skip - 1] == ranked[skip] and ranked[skip + keep - 1] == ranked[skip + keep]  # precondition: ties at both
    n_bot = n - skip - keep
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.sort(mags).indices[n_bot : n_bot + keep]] = True  # mergekit's magnitude_outliers
    pi = per_input_params(2, 0, weight=[None, 1.0], density=[None, density], gamma=[None, gamma])
    shared = shared_params(BREADCRUMBS)
    out = run_whole(BREADCRUMBS, [base, x], 0, shared, pi)
    assert torch.equal(out != 0, expected)
    assert torch.equal(run_blocked(BREADCRUMBS, [base, x], 0, shared, pi, [1, 77_777, 123_456]), out)
