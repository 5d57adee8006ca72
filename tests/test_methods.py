"""Unit tests for the merge methods (mergeedit.merging.methods), driven the way the executor drives them.

Expected numbers are worked out by hand (and written as literals) or come from plain reference implementations of
mergekit 0.1.5's generalized task arithmetic written here (argsort top-k, stacked sign masks), never from the code
under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from method_harness import (
    T,
    _probe,
    run_blocked,
    run_whole,
)
from method_harness import (
    per_input_params as _per_input,
)
from method_harness import (
    rand_models as _rand_models,
)
from method_harness import (
    shared_params as _shared,
)
from method_harness import (
    tie_free_models as _tie_free_models,
)

from mergeedit.core.errors import MergeEditError
from mergeedit.merging.methods import METHODS, MergeInputs, get_method, seeded_random, selection
from mergeedit.merging.methods.linear import LINEAR
from mergeedit.merging.methods.passthrough import COPY, PASSTHROUGH
from mergeedit.merging.methods.seeded_random import derive_seed, seeded_uniform
from mergeedit.merging.methods.selection import KthLargest, kth_largest_magnitude, magnitude_bits
from mergeedit.merging.methods.task_arithmetic import (
    DARE_LINEAR,
    DARE_TIES,
    RESCALE_EPS,
    TASK_ARITHMETIC,
    TIES,
    keep_count,
    random_keep,
)

# ----------------------------------------------------------------------------------------------------------------------
# A reference of mergekit 0.1.5's generalized task arithmetic, written plainly
# ----------------------------------------------------------------------------------------------------------------------


def ref_gta(tensors, base, shared, per_input, sparsify, consensus, seed=0):
    """Stacked-tensor reference: argsort top-k ("magnitude") or the package's positional Bernoulli mask ("random"),
    L1 rescale, weighted deltas, sum-sign mask over weighted deltas, divisor = sum of weights of agreeing entries."""
    n = tensors[0].numel()
    b = tensors[base]
    non_base = [i for i in range(len(tensors)) if i != base]
    whole = MergeInputs("t", list(tensors), base, shared, per_input, 0, n, seed)
    deltas = []
    for j, i in enumerate(non_base):
        d = tensors[i] - b
        density = per_input[i].get("density", 1.0)
        if sparsify is not None and density < 1:
            if density <= 0:
                mask = torch.zeros_like(d)
            elif sparsify == "magnitude":
                k = max(1, int(density * n))
                mask = torch.zeros_like(d)
                mask[torch.argsort(d.abs(), descending=True)[:k]] = 1
            else:
                mask = random_keep(whole, j).to(d.dtype)
            masked = d * mask
            if shared["rescale"]:
                before, after = d.abs().sum(), masked.abs().sum()
                if before >= RESCALE_EPS and after >= RESCALE_EPS:
                    masked = masked * (before / after)
            d = masked
        deltas.append(d)
    weights = torch.tensor([per_input[i]["weight"] for i in non_base], dtype=b.dtype).unsqueeze(-1)
    stacked = torch.stack(deltas) * weights
    if consensus:
        sign = (stacked.sum(0) >= 0).to(b.dtype) * 2 - 1
        mask = stacked.sign() == sign
        mixed = (stacked * mask).sum(0)
        divisor = (weights * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(0)
        divisor = weights.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if shared["normalize"]:
        mixed = mixed / divisor
    return b + mixed * shared["lambda"]


def _assert_inputs_untouched(method, tensors, base, shared, per_input, seed=0):
    before = [x.clone() for x in tensors]
    run_whole(method, tensors, base, shared, per_input, seed)
    for x, y in zip(tensors, before):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------------------------------
# Registry and declared parameters
# ----------------------------------------------------------------------------------------------------------------------


MERGEKIT_METHODS = {
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "ram", "ramplus_tl", "nearswap",
    "arcee_fusion", "passthrough",
}


def test_registry_names():
    """Every method mergekit 0.1.5 registers, under its name."""
    assert set(METHODS) == MERGEKIT_METHODS
    assert all(METHODS[name].name == name for name in METHODS)
    assert get_method("ties", "x") is TIES
    with pytest.raises(MergeEditError, match="unknown merge_method 'tiez'.*did you mean 'ties'"):
        get_method("tiez", "cfg.yaml")


@pytest.mark.parametrize(
    "method,normalize,rescale,randomized",
    [
        (TASK_ARITHMETIC, False, False, False),
        (TIES, True, False, False),
        (DARE_TIES, False, True, True),
        (DARE_LINEAR, False, True, True),
    ],
)
def test_family_defaults_match_mergekit_table(method, normalize, rescale, randomized):
    assert method.param("normalize").default is normalize
    assert method.param("rescale").default is rescale
    assert method.param("lambda").default == 1.0
    assert method.param("int8_mask").default is False
    assert method.param("weight").required and method.param("weight").scope == "non_base"
    assert method.param("density").default == 1.0 and method.param("density").scope == "non_base"
    assert method.base_model == "required"
    assert method.randomized is randomized
    assert method.elementwise


def test_linear_declared_params():
    assert LINEAR.param("normalize").default is True
    assert LINEAR.param("weight").required and LINEAR.param("weight").scope == "input"
    assert LINEAR.base_model == "optional"


# ----------------------------------------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------------------------------------


def test_linear_normalized_by_hand():
    out = run_whole(LINEAR, [T(1, 2), T(3, 4)], None, {"normalize": True}, [{"weight": 1.0}, {"weight": 3.0}])
    # (1*[1,2] + 3*[3,4]) / 4 = [10, 14] / 4
    assert torch.equal(out, T(2.5, 3.5))


def test_linear_unnormalized_by_hand():
    out = run_whole(LINEAR, [T(1, 2), T(3, 4)], None, {"normalize": False}, [{"weight": 1.0}, {"weight": 3.0}])
    assert torch.equal(out, T(10, 14))


def test_linear_three_models_negative_weight_and_shape_kept():
    xs = [torch.tensor([[1.0, -2.0], [0.5, 4.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 2.0], [2.0, 2.0]])]
    out = run_whole(LINEAR, xs, None, {"normalize": True}, [{"weight": 2.0}, {"weight": -1.0}, {"weight": 1.0}])
    # (2a - b + c) / 2
    assert out.shape == (2, 2)
    assert torch.equal(out, torch.tensor([[0.5, -1.0], [1.0, 4.5]]))


def test_linear_single_input_is_identity_when_normalized():
    x = T(0.25, -7.0, 3.0)
    assert torch.equal(run_whole(LINEAR, [x], None, {"normalize": True}, [{"weight": 0.5}]), x)
    assert torch.equal(run_whole(LINEAR, [x], None, {"normalize": False}, [{"weight": 0.5}]), x * 0.5)


def test_linear_check_rejects_zero_weight_sum_when_normalizing():
    with pytest.raises(ValueError, match="sum to zero"):
        LINEAR.check({"normalize": True}, [{"weight": 1.0}, {"weight": -1.0}])
    with pytest.raises(ValueError):
        LINEAR.check({"normalize": True}, [{"weight": 0.0}])
    # fine without normalize, and with a nonzero sum
    LINEAR.check({"normalize": False}, [{"weight": 1.0}, {"weight": -1.0}])
    LINEAR.check({"normalize": True}, [{"weight": 1.0}, {"weight": 0.0}])


def test_linear_does_not_modify_inputs():
    _assert_inputs_untouched(LINEAR, [T(1, 2), T(3, 4)], None, {"normalize": True}, [{"weight": 1.0}, {"weight": 3.0}])


# ----------------------------------------------------------------------------------------------------------------------
# task_arithmetic
# ----------------------------------------------------------------------------------------------------------------------

TA_BASE = T(1, 1, 1, 1)
TA_X1 = T(2, 0, 1, 5)  # delta [1, -1, 0, 4]
TA_X2 = T(3, 3, -1, 1)  # delta [2, 2, -2, 0]


def test_task_arithmetic_by_hand():
    pi = _per_input(3, 0, weight=[None, 1.0, 0.5])
    out = run_whole(TASK_ARITHMETIC, [TA_BASE, TA_X1, TA_X2], 0, _shared(TASK_ARITHMETIC), pi)
    # base + 1*[1,-1,0,4] + 0.5*[2,2,-2,0] = 1 + [2, 0, -1, 4]
    assert torch.equal(out, T(3, 1, 0, 5))


def test_task_arithmetic_normalize_and_lambda():
    pi = _per_input(3, 0, weight=[None, 1.0, 0.5])
    out = run_whole(TASK_ARITHMETIC, [TA_BASE, TA_X1, TA_X2], 0, _shared(TASK_ARITHMETIC, normalize=True), pi)
    # mixed [2, 0, -1, 4] / 1.5
    assert torch.allclose(out, 1 + T(2, 0, -1, 4) / 1.5, atol=1e-7)
    out = run_whole(TASK_ARITHMETIC, [TA_BASE, TA_X1, TA_X2], 0, _shared(TASK_ARITHMETIC, **{"lambda": 0.5}), pi)
    assert torch.equal(out, T(2, 1, 0.5, 3))
    out = run_whole(TASK_ARITHMETIC, [TA_BASE, TA_X1, TA_X2], 0, _shared(TASK_ARITHMETIC, normalize=True, **{"lambda": 3.0}), pi)
    assert torch.allclose(out, 1 + 3 * T(2, 0, -1, 4) / 1.5, atol=1e-6)


def test_task_arithmetic_normalize_with_zero_weight_sum_divides_by_one():
    pi = _per_input(3, 0, weight=[None, 1.0, -1.0])
    out = run_whole(TASK_ARITHMETIC, [TA_BASE, TA_X1, TA_X2], 0, _shared(TASK_ARITHMETIC, normalize=True), pi)
    # 1*[1,-1,0,4] - [2,2,-2,0] = [-1,-3,2,4]; divisor |0| < 1e-8 -> 1
    assert torch.equal(out, T(0, -2, 3, 5))


def test_task_arithmetic_base_in_the_middle_and_density_ignored():
    # base at index 1; task_arithmetic does not sparsify, so density is irrelevant
    pi = _per_input(3, 1, weight=[1.0, None, 0.5], density=[0.1, None, 0.1])
    assert TASK_ARITHMETIC.statistics(_probe([TA_X1, TA_BASE, TA_X2], 1, _shared(TASK_ARITHMETIC), pi, 4, 0)) is None
    out = run_whole(TASK_ARITHMETIC, [TA_X1, TA_BASE, TA_X2], 1, _shared(TASK_ARITHMETIC), pi)
    assert torch.equal(out, T(3, 1, 0, 5))


def test_task_arithmetic_only_base_returns_copy_of_base():
    out = run_whole(TASK_ARITHMETIC, [TA_BASE], 0, _shared(TASK_ARITHMETIC), [{}])
    assert torch.equal(out, TA_BASE)


def test_task_arithmetic_matches_reference_random():
    xs = _rand_models(3, 500, seed=1)
    pi = _per_input(4, 0, weight=[None, 0.7, -0.2, 1.3])
    for normalize in (False, True):
        shared = _shared(TASK_ARITHMETIC, normalize=normalize, **{"lambda": 0.8})
        out = run_whole(TASK_ARITHMETIC, xs, 0, shared, pi)
        assert torch.allclose(out, ref_gta(xs, 0, shared, pi, None, False), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# ties: hand-worked
# ----------------------------------------------------------------------------------------------------------------------
#
# base = [0.5, -1, 2, 0, 1, -0.5, 0.25, 3]                       n = 8
# d1 = [ 4, -2,    1, -3,    0.5,   2.5, -1.5, 0.25]  density 0.5  -> k=4: |4|,|-3|,|2.5|,|-2|
#   t1 = [ 4, -2,  0, -3,  0,    2.5,  0,  0]
# d2 = [-1,  3, -0.5, 0.75, -6,    0.25,  2,  -1.25]  density 0.25 -> k=2: |-6|,|3|
#   t2 = [ 0,  3,  0,  0,  -6,   0,    0,  0]
# d3 = [-2, 1.75, -3, 1.5,  2.75, -0.25, -4,  0.5]   density 0.75 -> k=6: all but |0.5|,|-0.25|
#   t3 = [-2, 1.75, -3, 1.5, 2.75, 0,   -4,  0]
# weights [1, 0.5, 2]; weighted:
#   w1 = [ 4, -2, 0, -3, 0,    2.5, 0, 0]
#   w2 = [ 0, 1.5, 0, 0, -3,   0,   0, 0]
#   w3 = [-4, 3.5, -6, 3, 5.5, 0,  -8, 0]
#   sum= [ 0, 3,  -6, 0, 2.5,  2.5, -8, 0]  -> elected [+,+,-,+,+,+,-,+]  (sum 0 elects +)
#   (position 4: the unweighted vote -6 + 2.75 < 0 would elect -; the weighted vote elects +)
# agreeing sums:     [4, 5,   -6, 3,   5.5,  2.5, -8, 0]
# agreeing weights:  [1, 2.5,  2, 2,   2,    1,    2, 0->1]
# normalized delta:  [4, 2,   -3, 1.5, 2.75, 2.5, -4, 0]

TIES_BASE = T(0.5, -1, 2, 0, 1, -0.5, 0.25, 3)
TIES_X = [
    T(4.5, -3, 3, -3, 1.5, 2, -1.25, 3.25),
    T(-0.5, 2, 1.5, 0.75, -5, -0.25, 2.25, 1.75),
    T(-1.5, 0.75, -1, 1.5, 3.75, -0.75, -3.75, 3.5),
]
TIES_W = [1.0, 0.5, 2.0]
TIES_D = [0.5, 0.25, 0.75]


def _ties_case(base_index: int):
    xs = list(TIES_X)
    xs.insert(base_index, TIES_BASE)
    w = list(TIES_W)
    w.insert(base_index, None)
    d = list(TIES_D)
    d.insert(base_index, None)
    return xs, _per_input(4, base_index, weight=w, density=d)


@pytest.mark.parametrize("base_index", [0, 1, 3])
def test_ties_by_hand_normalized(base_index):
    xs, pi = _ties_case(base_index)
    out = run_whole(TIES, xs, base_index, _shared(TIES), pi)
    assert torch.equal(out, T(4.5, 1, -1, 1.5, 3.75, 2.0, -3.75, 3))


def test_ties_by_hand_not_normalized():
    xs, pi = _ties_case(0)
    out = run_whole(TIES, xs, 0, _shared(TIES, normalize=False), pi)
    # base + [4, 5, -6, 3, 5.5, 2.5, -8, 0]
    assert torch.equal(out, T(4.5, 4, -4, 3, 6.5, 2, -7.75, 3))


def test_ties_by_hand_lambda():
    xs, pi = _ties_case(0)
    out = run_whole(TIES, xs, 0, _shared(TIES, **{"lambda": 0.5}), pi)
    # base + 0.5 * [4, 2, -3, 1.5, 2.75, 2.5, -4, 0]
    assert torch.equal(out, T(2.5, 0, 0.5, 0.75, 2.375, 0.75, -1.75, 3))


def test_ties_by_hand_2d_shape():
    xs, pi = _ties_case(0)
    xs = [x.reshape(2, 4) for x in xs]
    out = run_whole(TIES, xs, 0, _shared(TIES), pi)
    assert out.shape == (2, 4)
    assert torch.equal(out.reshape(-1), T(4.5, 1, -1, 1.5, 3.75, 2.0, -3.75, 3))


def test_ties_negative_weight_votes_with_weighted_sign():
    # mergekit masks on the signs of the WEIGHTED deltas; a negative weight flips a model's vote.
    base = T(0, 0, 0)
    x1 = T(2, 1, -1)
    x2 = T(1, 4, 3)
    pi = _per_input(3, 0, weight=[None, 1.0, -1.0], density=[None, 1.0, 1.0])
    out = run_whole(TIES, [base, x1, x2], 0, _shared(TIES), pi)
    # weighted: [2,1,-1] and [-1,-4,-3]; sums [1,-3,-4] -> [+,-,-]
    # pos 0: + -> 2 (w 1) -> 2/1 = 2
    # pos 1: - -> -4 (w -1) -> -4/-1 = 4
    # pos 2: - -> -1 + -3 = -4, weights 1 + -1 = 0 -> divisor 1 -> -4
    assert torch.equal(out, T(2, 4, -4))


def test_ties_zero_deltas_excluded_from_divisor():
    base = T(1, 1, 1, 1)
    x1 = T(1, 3, 1, 0)  # delta [0, 2, 0, -1]
    x2 = T(2, 5, 1, 1)  # delta [1, 4, 0, 0]
    pi = _per_input(3, 0, weight=[None, 1.0, 3.0])
    out = run_whole(TIES, [base, x1, x2], 0, _shared(TIES), pi)
    # weighted [0,2,0,-1], [3,12,0,0]; sums [3,14,0,-1] -> [+,+,+,-]
    # pos0: 3/3 = 1; pos1: 14/4 = 3.5; pos2: nothing agrees -> 0; pos3: -1/1 = -1
    assert torch.equal(out, T(2, 4.5, 1, 0))


@pytest.mark.parametrize(
    "density,numel,expected",
    [(0.5, 8, 4), (0.3, 8, 2), (0.1, 8, 1), (0.01, 50, 1), (0.29, 100, 28), (1.0, 7, 7), (0.999, 10, 9)],
)
def test_keep_count_is_int_of_density_times_n_at_least_one(density, numel, expected):
    # int() truncates, exactly as mergekit's int(density * numel): 0.29 * 100 = 28.999999999999996 -> 28
    assert keep_count(density, numel) == expected


def test_ties_topk_count_single_model():
    base = torch.zeros(8)
    x = T(1, -8, 3, -2, 7, 0.5, -6, 4)
    for density, kept in [(0.3, [-8, 7]), (0.1, [-8]), (0.5, [-8, 7, -6, 4]), (0.99, [1, -8, 3, -2, 7, -6, 4])]:
        pi = _per_input(2, 0, weight=[None, 1.0], density=[None, density])
        out = run_whole(TIES, [base, x], 0, _shared(TIES), pi)
        expected = torch.where(torch.isin(x, torch.tensor(kept, dtype=torch.float32)), x, torch.zeros(8))
        assert torch.equal(out, expected), density


def test_ties_density_zero_drops_model_and_density_one_keeps_all():
    base = T(1, 1, 1, 1)
    x1 = T(2, 3, 0, 1)  # delta [1, 2, -1, 0]
    x2 = T(0, 1, 4, 5)  # delta [-1, 0, 3, 4]
    pi = _per_input(3, 0, weight=[None, 1.0, 1.0], density=[None, 1.0, 0.0])
    out = run_whole(TIES, [base, x1, x2], 0, _shared(TIES), pi)
    assert torch.equal(out, x1)
    pi = _per_input(3, 0, weight=[None, 1.0, 1.0], density=[None, 0.0, 0.0])
    assert torch.equal(run_whole(TIES, [base, x1, x2], 0, _shared(TIES), pi), base)


def test_ties_rescale_by_hand():
    base = torch.zeros(4)
    x = T(4, -1, 2, -3)  # L1 10; density 0.5 keeps 4, -3 (L1 7) -> scaled by 10/7
    pi = _per_input(2, 0, weight=[None, 1.0], density=[None, 0.5])
    out = run_whole(TIES, [base, x], 0, _shared(TIES, rescale=True), pi)
    assert torch.allclose(out, T(40 / 7, 0, 0, -30 / 7), atol=1e-6)
    assert math.isclose(float(out.abs().sum()), 10.0, rel_tol=1e-6)


def test_ties_statistics_passes():
    pi = _per_input(3, 0, weight=[None, 1.0, 1.0], density=[None, 0.5, 1.0])
    probe = _probe([None] * 3, 0, _shared(TIES), pi, 10, 0)
    stats = TIES.statistics(probe)
    assert stats.passes == 2 and stats.sparse == [0]
    stats = TIES.statistics(_probe([None] * 3, 0, _shared(TIES, rescale=True), pi, 10, 0))
    assert stats.passes == 3
    pi = _per_input(3, 0, weight=[None, 1.0, 1.0], density=[None, 1.0, 0.0])
    assert TIES.statistics(_probe([None] * 3, 0, _shared(TIES), pi, 10, 0)) is None


def test_ties_does_not_modify_inputs():
    xs, pi = _ties_case(1)
    _assert_inputs_untouched(TIES, xs, 1, _shared(TIES, rescale=True), pi)


def test_ties_empty_tensor():
    xs = [torch.zeros(0) for _ in range(3)]
    pi = _per_input(3, 0, weight=[None, 1.0, 1.0], density=[None, 0.5, 0.5])
    assert run_whole(TIES, xs, 0, _shared(TIES), pi).numel() == 0


# ----------------------------------------------------------------------------------------------------------------------
# ties: against the argsort reference on random tensors without exact ties
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("densities", [(0.5, 0.5, 0.5), (0.2, 0.7, 0.05), (0.0, 0.3, 1.0), (1.0, 1.0, 1.0), (0.001, 0.9, 0.0)])
def test_ties_matches_argsort_reference(rescale, normalize, densities):
    n = 997
    xs = _tie_free_models(3, n, seed=int(sum(densities) * 1000))
    for x in xs[1:]:
        assert torch.unique((x - xs[0]).abs()).numel() == n  # no exact ties: top-k is unambiguous
    pi = _per_input(4, 0, weight=[None, 0.625, 1.125, 0.375], density=[None, *densities])
    shared = _shared(TIES, normalize=normalize, rescale=rescale, **{"lambda": 1.25})
    out = run_whole(TIES, xs, 0, shared, pi)
    ref = ref_gta(xs, 0, shared, pi, "magnitude", consensus=True)
    assert torch.allclose(out, ref, atol=1e-6)


def test_ties_kept_count_equals_k_without_ties():
    n = 1000
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(n)
    x = torch.randn(n, generator=g)
    for density in (0.013, 0.1, 0.5, 0.77):
        pi = _per_input(2, 0, weight=[None, 1.0], density=[None, density])
        out = run_whole(TIES, [base, x], 0, _shared(TIES), pi)
        assert int((out != 0).sum()) == max(1, int(density * n))


def test_ties_keeps_exactly_k_taking_the_tied_magnitudes_mergekits_argsort_takes():
    """k = 3 of |3, -2, 2, -2, 1, 0.5|: 3 and two of the three 2s. As mergekit, exactly k are kept; of the tied
    entries, those mergekit's argsort(|x|, descending=True)[:k] takes (selection.TieOrder). Cut anywhere, the same."""
    base = torch.zeros(6)
    x = T(3, -2, 2, -2, 1, 0.5)
    pi = _per_input(2, 0, weight=[None, 1.0], density=[None, 0.5])  # k = 3, 3rd magnitude = 2
    out = run_whole(TIES, [base, x], 0, _shared(TIES), pi)
    keep = torch.zeros(6, dtype=torch.bool)
    keep[torch.argsort(x.abs(), descending=True)[:3]] = True
    assert int(keep[1:4].sum()) == 2  # the precondition: two of the three tied 2s
    assert torch.equal(out, x * keep)
    for cuts in ([1], [2], [3], [1, 2, 4]):
        assert torch.equal(run_blocked(TIES, [base, x], 0, _shared(TIES), pi, cuts), out), cuts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rescale", [False, True])
def test_ties_exact_k_on_a_large_tie_group(dtype, rescale):
    """200k entries (past the direct-selection size, so the radix or band passes settle the threshold) whose
    magnitudes take only 64 values: the k-th place falls inside a group of ~3000 equal magnitudes. Exactly k entries
    survive, those of the threshold magnitude that mergekit's argsort keeps, the same whole and cut at odd places; the
    rescale factor is original / kept L1 norm of exactly those k."""
    g = torch.Generator().manual_seed(3)
    n, density = 200_000, 0.37
    levels = torch.randint(1, 65, (n,), generator=g).to(torch.float32) / 64
    x = (levels * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)).to(dtype)
    base = torch.zeros(n, dtype=dtype)
    k = int(density * n)
    mags = x.abs().float()
    thr = mags.sort(descending=True).values[k - 1]
    greater, equal = int((mags > thr).sum()), int((mags == thr).sum())
    assert greater < k < greater + equal and equal > 1000  # the precondition: a big tie group straddles k
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.argsort(mags, descending=True)[:k]] = True  # mergekit's magnitude()
    pi = _per_input(2, 0, weight=[None, 1.0], density=[None, density])
    shared = {**_shared(TIES), "rescale": rescale, "normalize": False}
    out = run_whole(TIES, [base, x], 0, shared, pi)
    assert int((out != 0).sum()) == k
    factor = float(mags.double().sum() / (mags.double() * keep).sum()) if rescale else 1.0
    if dtype == torch.float32:
        assert torch.equal(out, x * keep * factor if rescale else x * keep)
    else:
        assert torch.equal(out != 0, keep)
    assert torch.equal(run_blocked(TIES, [base, x], 0, shared, pi, [1, 77_777, 123_456]), out)


# ----------------------------------------------------------------------------------------------------------------------
# chunking invariance: blocked statistics + blocked merge == whole tensor, exactly
# ----------------------------------------------------------------------------------------------------------------------

CUTS = [[1], [100, 101, 102], [7, 350, 351, 800], list(range(64, 1000, 64))]


@pytest.mark.parametrize("cuts", CUTS)
@pytest.mark.parametrize(
    "method,overrides",
    [
        (TIES, {}),
        (TIES, {"rescale": True, "normalize": False}),
        (DARE_TIES, {}),
        (DARE_TIES, {"rescale": False, "normalize": True}),
        (DARE_LINEAR, {}),
        (DARE_LINEAR, {"rescale": False}),
        (TASK_ARITHMETIC, {"normalize": True}),
    ],
    ids=lambda v: getattr(v, "name", None) or str(v),
)
def test_blocked_equals_whole(method, overrides, cuts):
    n = 1000
    xs = _rand_models(3, n, seed=11)
    xs.insert(2, xs.pop(0))  # base at index 2
    pi = _per_input(4, 2, weight=[0.9, 0.4, None, 1.2], density=[0.3, 0.05, None, 0.8])
    shared = _shared(method, **overrides)
    whole = run_whole(method, xs, 2, shared, pi, seed=1234)
    blocked = run_blocked(method, xs, 2, shared, pi, cuts, seed=1234)
    assert torch.equal(whole, blocked)


@pytest.mark.parametrize("method", [DARE_TIES, DARE_LINEAR])
def test_blocked_equals_whole_across_noise_blocks(method, monkeypatch):
    # key spans of the positional noise (seeded_random.SPAN) shrunk so merge blocks straddle them
    monkeypatch.setattr(seeded_random, "SPAN", 96)
    n = 1000
    xs = _rand_models(2, n, seed=5)
    pi = _per_input(3, 0, weight=[None, 0.8, 0.6], density=[None, 0.4, 0.6])
    shared = _shared(method)
    whole = run_whole(method, xs, 0, shared, pi, seed=77)
    for cuts in ([50], [95, 96, 97, 500], list(range(33, 1000, 33))):
        assert torch.equal(whole, run_blocked(method, xs, 0, shared, pi, cuts, seed=77))
    assert torch.allclose(whole, ref_gta(xs, 0, shared, pi, "random", method is DARE_TIES, seed=77), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# dare_ties / dare_linear
# ----------------------------------------------------------------------------------------------------------------------


def _dare_setup(n=2000, density=0.3, seed_models=21):
    xs = _rand_models(2, n, seed=seed_models)
    pi = _per_input(3, 0, weight=[None, 0.7, 0.5], density=[None, density, density])
    return xs, pi


@pytest.mark.parametrize("method", [DARE_TIES, DARE_LINEAR])
def test_dare_same_seed_same_output(method):
    xs, pi = _dare_setup()
    a = run_whole(method, xs, 0, _shared(method), pi, seed=42)
    b = run_whole(method, xs, 0, _shared(method), pi, seed=42)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", [DARE_TIES, DARE_LINEAR])
def test_dare_different_seed_different_mask(method):
    xs, pi = _dare_setup()
    a = run_whole(method, xs, 0, _shared(method), pi, seed=42)
    b = run_whole(method, xs, 0, _shared(method), pi, seed=43)
    assert not torch.equal(a, b)
    # the masks themselves: overlap of two independent Bernoulli(0.3) masks ~ 0.09, not 0.3
    def inputs(s):
        return MergeInputs("t", xs, 0, _shared(method), pi, 0, xs[0].numel(), s)

    m42, m43 = random_keep(inputs(42), 0), random_keep(inputs(43), 0)
    assert not torch.equal(m42, m43)
    assert float((m42 * m43).mean()) < 0.15  # float 1/0 masks


def test_dare_masks_differ_between_models():
    xs, pi = _dare_setup()
    inputs = MergeInputs("t", xs, 0, _shared(DARE_TIES), pi, 0, xs[0].numel(), 9)
    assert not torch.equal(random_keep(inputs, 0), random_keep(inputs, 1))


def test_random_keep_is_positional_noise_below_density():
    xs, pi = _dare_setup(n=300)
    inputs = MergeInputs("t", xs, 0, _shared(DARE_TIES), pi, 0, 300, 5)
    expected = seeded_uniform(derive_seed(5, 1), 0, 300) < 0.3
    assert torch.equal(random_keep(inputs, 0), expected)
    # a block at an offset regenerates its own slice
    block = MergeInputs("t", [x[100:180] for x in xs], 0, _shared(DARE_TIES), pi, 100, 300, 5)
    assert torch.equal(random_keep(block, 0), expected[100:180])


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_close_to_density(density):
    n = 200_000
    base = torch.zeros(n)
    x = torch.ones(n)
    pi = _per_input(2, 0, weight=[None, 1.0], density=[None, density])
    out = run_whole(DARE_LINEAR, [base, x], 0, _shared(DARE_LINEAR, rescale=False), pi, seed=3)
    kept = float((out != 0).float().mean())
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept - density) < 5 * sigma
    assert set(torch.unique(out).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("method", [DARE_TIES, DARE_LINEAR])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.8])
def test_dare_rescale_preserves_l1_norm(method, density):
    n = 5000
    g = torch.Generator().manual_seed(8)
    base = torch.randn(n, generator=g)
    x = base + torch.randn(n, generator=g)
    pi = _per_input(2, 0, weight=[None, 1.0], density=[None, density])
    out = run_whole(method, [base, x], 0, _shared(method), pi, seed=10)
    delta = (x - base).double()
    kept = (out - base).double()
    assert 0 < int((kept != 0).sum()) < n
    assert math.isclose(float(kept.abs().sum()), float(delta.abs().sum()), rel_tol=1e-5)
    # without rescale the kept entries are the unscaled deltas
    out_plain = run_whole(method, [base, x], 0, _shared(method, rescale=False), pi, seed=10)
    mask = out_plain != base
    assert torch.allclose((out_plain - base)[mask], (x - base)[mask], atol=1e-6)
    scale = float(delta.abs().sum()) / float(delta[mask].abs().sum())
    assert torch.allclose(out - base, (out_plain - base) * scale, atol=1e-5)


@pytest.mark.parametrize("method", [DARE_TIES, DARE_LINEAR])
def test_dare_rescale_below_eps_left_unscaled_no_nan(method):
    base = T(1, 2, 3, 4)
    pi = _per_input(2, 0, weight=[None, 1.0], density=[None, 0.5])
    out = run_whole(method, [base, base.clone()], 0, _shared(method), pi, seed=1)  # zero delta: before < eps
    assert torch.equal(out, base)
    # density 0: every entry dropped (after = 0 < eps) -> base, no NaN
    x = T(2, 3, 4, 5)
    pi = _per_input(2, 0, weight=[None, 1.0], density=[None, 0.0])
    out = run_whole(method, [base, x], 0, _shared(method), pi, seed=1)
    assert torch.equal(out, base)
    # density 1: nothing dropped, nothing rescaled
    pi = _per_input(2, 0, weight=[None, 1.0], density=[None, 1.0])
    assert torch.equal(run_whole(method, [base, x], 0, _shared(method), pi, seed=1), x)


@pytest.mark.parametrize("method", [DARE_TIES, DARE_LINEAR])
@pytest.mark.parametrize("overrides", [{}, {"rescale": False}, {"normalize": True, "lambda": 0.7}])
@pytest.mark.parametrize("densities", [(0.3, 0.6, 0.9), (0.0, 1.0, 0.5), (0.02, 0.02, 0.02)])
def test_dare_matches_reference(method, overrides, densities):
    xs = _rand_models(3, 800, seed=31)
    pi = _per_input(4, 0, weight=[None, 0.5, -0.3, 1.0], density=[None, *densities])
    shared = _shared(method, **overrides)
    out = run_whole(method, xs, 0, shared, pi, seed=2024)
    ref = ref_gta(xs, 0, shared, pi, "random", consensus=method is DARE_TIES, seed=2024)
    assert torch.allclose(out, ref, atol=1e-6)


def test_dare_linear_by_hand_with_known_mask():
    # compute the mask from the positional noise, then check the formula entry by entry
    n = 16
    base = torch.arange(n, dtype=torch.float32)
    x1 = base + 2.0
    x2 = base - 1.0
    pi = _per_input(3, 0, weight=[None, 1.0, 0.5], density=[None, 0.5, 0.5])
    inputs = MergeInputs("t", [base, x1, x2], 0, _shared(DARE_LINEAR), pi, 0, n, 99)
    m1, m2 = random_keep(inputs, 0), random_keep(inputs, 1)
    assert 0 < int(m1.sum()) < n and 0 < int(m2.sum()) < n
    s1 = n * 2.0 / (int(m1.sum()) * 2.0)  # L1 before / after
    s2 = n * 1.0 / (int(m2.sum()) * 1.0)
    expected = base + m1 * (2.0 * s1) * 1.0 + m2 * (-1.0 * s2) * 0.5
    out = run_whole(DARE_LINEAR, [base, x1, x2], 0, _shared(DARE_LINEAR), pi, seed=99)
    assert torch.allclose(out, expected, atol=1e-6)


def test_dare_statistics_only_when_rescaling():
    pi = _per_input(2, 0, weight=[None, 1.0], density=[None, 0.5])
    assert DARE_LINEAR.statistics(_probe([None] * 2, 0, _shared(DARE_LINEAR, rescale=False), pi, 10, 0)) is None
    stats = DARE_LINEAR.statistics(_probe([None] * 2, 0, _shared(DARE_LINEAR), pi, 10, 0))
    assert stats.passes == 1
    pi = _per_input(2, 0, weight=[None, 1.0], density=[None, 1.0])
    assert DARE_TIES.statistics(_probe([None] * 2, 0, _shared(DARE_TIES), pi, 10, 0)) is None


@pytest.mark.parametrize("method", [DARE_TIES, DARE_LINEAR, TASK_ARITHMETIC])
def test_family_does_not_modify_inputs(method):
    xs, pi = _dare_setup(n=100)
    _assert_inputs_untouched(method, xs, 0, _shared(method), pi, seed=3)


# ----------------------------------------------------------------------------------------------------------------------
# compute dtype
# ----------------------------------------------------------------------------------------------------------------------


def test_ties_float64_compute_keeps_float64_precision():
    xs = [torch.zeros(4, dtype=torch.float64), T(1, 2, 3, 4, dtype=torch.float64), T(3, 6, 9, 12, dtype=torch.float64)]
    pi = _per_input(3, 0, weight=[None, 0.1, 0.3])
    out = run_whole(TIES, xs, 0, _shared(TIES), pi)
    expected = (xs[1] * 0.1 + xs[2] * 0.3) / (0.1 + 0.3)  # [2.5, 5, 7.5, 10] in float64
    assert out.dtype == torch.float64
    assert torch.allclose(out, expected, rtol=1e-12, atol=0)


def test_task_arithmetic_float64_compute_precision():
    xs = [torch.zeros(4, dtype=torch.float64), T(1, 2, 3, 4, dtype=torch.float64), T(3, 6, 9, 12, dtype=torch.float64)]
    pi = _per_input(3, 0, weight=[None, 0.1, 0.3])
    out = run_whole(TASK_ARITHMETIC, xs, 0, _shared(TASK_ARITHMETIC, normalize=True), pi)
    assert out.dtype == torch.float64
    assert torch.allclose(out, (xs[1] * 0.1 + xs[2] * 0.3) / 0.4, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# selection: exact k-th largest magnitude
# ----------------------------------------------------------------------------------------------------------------------


def _kth_ref(x: torch.Tensor, k: int) -> float:
    a = x.reshape(-1).abs().to(torch.float32)
    return float(torch.kthvalue(a, a.numel() - k + 1).values)


def _sample_ks(n: int, g: torch.Generator) -> list[int]:
    ks = {1, n, (n + 1) // 2}
    ks.update(int(v) + 1 for v in torch.randint(0, n, (2,), generator=g))
    return sorted(ks)


@pytest.fixture(params=["default", "histogram"])
def selection_path(request, monkeypatch):
    """Run selection tests twice: as shipped, and with any small-tensor shortcut shrunk so the radix histograms run."""
    if request.param == "histogram":
        monkeypatch.setattr(selection, "SMALL", 4, raising=False)
    return request.param


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000])
def test_kth_largest_matches_kthvalue_random(n, selection_path):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)
    for k in _sample_ks(n, g):
        assert kth_largest_magnitude(x, k) == _kth_ref(x, k), k


def test_kth_largest_matches_kthvalue_large():
    n = 70_001  # above any small-tensor shortcut
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)
    for k in (12_345, n):
        assert kth_largest_magnitude(x, k) == _kth_ref(x, k), k


def test_kth_largest_single_element_and_negative(selection_path):
    assert kth_largest_magnitude(T(-3.5), 1) == 3.5
    assert kth_largest_magnitude(T(0.0), 1) == 0.0
    assert kth_largest_magnitude(T(-0.0), 1) == 0.0


def test_kth_largest_duplicates_negatives_zeros(selection_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (503,), generator=g).float() * 0.5  # many duplicates, zeros, both signs
    for k in (1, 111, 112, 251, 480, 503):
        assert kth_largest_magnitude(x, k) == _kth_ref(x, k)
    x = T(-2, 2, -2, 0, 0, 1)
    assert [kth_largest_magnitude(x, k) for k in range(1, 7)] == [2, 2, 2, 1, 0, 0]


def test_kth_largest_values_within_one_high_bucket(selection_path):
    # identical high 16 bits: the low-level histogram decides
    base_bits = torch.tensor([0x3F800000], dtype=torch.int32)  # 1.0
    bits = base_bits + torch.randperm(5000, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    x = bits.view(torch.float32) * torch.where(torch.arange(5000) % 2 == 0, 1.0, -1.0)
    for k in (1, 100, 4999, 5000):
        assert kth_largest_magnitude(x, k) == _kth_ref(x, k)


def test_kth_largest_extreme_values(selection_path):
    x = T(float("inf"), -1e-40, 3.4e38, -1e-30, 0.0, 7.0)  # inf, a subnormal, the largest floats
    for k in range(1, 7):
        assert kth_largest_magnitude(x, k) == _kth_ref(x, k)


def test_kth_largest_float64_input_compared_in_float32(selection_path):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2001, generator=g, dtype=torch.float64)
    for k in (1, 1000, 2001):
        assert kth_largest_magnitude(x, k) == _kth_ref(x, k)


def test_kth_largest_2d_input(selection_path):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(31, 17, generator=g)
    for k in (50, 527):
        assert kth_largest_magnitude(x, k) == _kth_ref(x, k)


def test_magnitude_bits_order_like_magnitudes():
    x = T(-3, 0.5, 2, -0.25, 0, 1e-40, float("inf"))
    bits = magnitude_bits(x)
    assert bits.dtype == torch.int32
    assert torch.equal(torch.argsort(bits), torch.argsort(x.abs()))


@pytest.mark.parametrize("n_chunks", [1, 5, 13])
def test_kth_largest_streamed_in_chunks_equals_one_shot(n_chunks, selection_path):
    g = torch.Generator().manual_seed(n_chunks)
    x = torch.randn(4099, generator=g)
    x[::10] = x[5]  # duplicates
    chunks = list(torch.tensor_split(x, n_chunks))
    for k in (1, 410, 4099):
        sel = _stream_kth(chunks, k)
        assert sel.threshold == kth_largest_magnitude(x, k) == _kth_ref(x, k)
        # the bit pattern reproduces the top-k selection: >= threshold keeps at least k (exactly k without ties)
        assert int((magnitude_bits(x) >= sel.threshold_bits).sum()) >= k


def _stream_kth(chunks, k):
    """Feed chunks through both radix passes, as the executor's statistics passes do."""
    return _radix_passes(KthLargest(k), chunks)


def _radix_passes(sel: KthLargest, chunks) -> KthLargest:
    for c in chunks:
        sel.observe_high(magnitude_bits(c))
    sel.end_high()
    for c in chunks:
        sel.observe_low(magnitude_bits(c))
    sel.end_low()
    return sel


def test_kth_largest_chunks_crossing_small_limit():
    # the stream starts small and grows past any small-tensor shortcut part-way through
    g = torch.Generator().manual_seed(9)
    x = torch.randn(70_000, generator=g)
    x[:1000] = x[0]
    chunks = [x[:10], x[10:1000], x[1000:60_000], x[60_000:]]
    for k in (3, 35_000):
        sel = _stream_kth(chunks, k)
        assert sel.threshold == _kth_ref(x, k)


def test_kth_largest_chunks_with_empty_chunk(selection_path):
    x = T(5, -1, 3, 2, -4)
    sel = KthLargest(2)
    for c in (x[:2], x[2:2], x[2:]):
        sel.observe_high(magnitude_bits(c))
    sel.end_high()
    for c in (x[:2], x[2:2], x[2:]):
        sel.observe_low(magnitude_bits(c))
    sel.end_low()
    assert sel.threshold == 4.0


def _band_pass(sel: KthLargest, chunks) -> bool:
    for c in chunks:
        sel.observe_band(magnitude_bits(c))
    return sel.end_band()


def _heavy_tailed(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 2)


@pytest.mark.parametrize("n_chunks", [1, 7])
def test_band_settles_the_exact_kth_largest_in_one_pass(n_chunks):
    n = selection.BAND_MIN + 4099
    x = _heavy_tailed(n, n_chunks)
    x[::97] = x[3]  # duplicates, some of them inside the band
    bits = magnitude_bits(x)
    for k in (1, 37, n // 10, n // 2, n - 5, n):
        sel = KthLargest(k)
        assert sel.aim(bits[:: n // 16384], n)
        lo, hi = sel.band
        assert _band_pass(sel, torch.tensor_split(x, n_chunks)), k
        assert sel.threshold == _kth_ref(x, k), k
        assert lo <= sel.threshold_bits <= hi
        sel.observe_low(bits)  # a settled selection ignores any later pass
        sel.end_low()
        assert sel.threshold == _kth_ref(x, k)


def test_band_is_narrow():
    n = 1 << 20
    x = _heavy_tailed(n, 1)
    bits = magnitude_bits(x)
    sel = KthLargest(n // 2)
    sel.aim(bits[:: n // 16384], n)
    lo, hi = sel.band
    inside = int(((bits >= lo) & (bits <= hi)).sum())
    assert 0 < inside < n // 20  # about 2 * 5 sigma of a 2^14 sample: ~4% of the values, and never all of them


@pytest.mark.parametrize("wrong", ["high", "low", "wide"])
def test_band_guessed_wrong_falls_back_to_the_radix_passes(wrong):
    n = selection.BAND_MIN + 11
    x = _heavy_tailed(n, 5)
    bits = magnitude_bits(x)
    k = n // 3
    sample = {"high": bits[::16] * 0 + magnitude_bits(T(1e30)), "low": bits[::16] * 0 + 1, "wide": bits[:2048].clone()}[wrong]
    if wrong == "wide":  # a band from the extremes holds every value: far above the cap, so it is given up
        sample[: 1024] = int(bits.min())
        sample[1024:] = int(bits.max())
    sel = KthLargest(k)
    assert sel.aim(sample, n)
    assert not _band_pass(sel, torch.tensor_split(x, 3))
    assert not sel.done
    assert _radix_passes(sel, torch.tensor_split(x, 3)).threshold == _kth_ref(x, k)


def test_band_over_exact_zeros_and_a_single_repeated_value():
    n = selection.BAND_MIN * 2
    x = torch.zeros(n)
    x[: n // 10] = _heavy_tailed(n // 10, 2)  # an untouched tensor's delta: mostly exact zeros
    for k in (n // 20, n // 10, n // 10 + 1, n // 2, n):
        sel = KthLargest(k)
        assert sel.aim(magnitude_bits(x)[::64], n)
        assert sel.band[0] >= 1  # zeros never enter the band
        assert _band_pass(sel, [x])
        assert sel.threshold == _kth_ref(x, k), k
    y = torch.full((n,), -0.25)
    y[:100] = 3.0
    y[100:200] = 7.0
    for k in (50, 100, 150, 200, 201, n):
        sel = KthLargest(k)
        assert sel.aim(magnitude_bits(y)[::64], n)
        chunks = torch.tensor_split(y, 4)
        if not _band_pass(sel, chunks):  # a band reaching down to the mass of 0.25s holds too much: given up
            _radix_passes(sel, chunks)
        assert sel.threshold == _kth_ref(y, k), k


def test_band_is_not_aimed_for_small_tensors_or_small_samples():
    assert not KthLargest(10).aim(torch.ones(4096, dtype=torch.int32), selection.BAND_MIN - 1)
    assert not KthLargest(10).aim(torch.ones(selection.BAND_SAMPLE_MIN - 1, dtype=torch.int32), selection.BAND_MIN)
    sel = KthLargest(10)
    assert not sel.end_band()  # nothing aimed: nothing settled, the radix passes run as before


# ----------------------------------------------------------------------------------------------------------------------
# seeded_random
# ----------------------------------------------------------------------------------------------------------------------


def test_derive_seed_deterministic_and_63_bit():
    a = derive_seed(1, "model.layers.0.weight", 2)
    assert a == derive_seed(1, "model.layers.0.weight", 2)
    assert a != derive_seed(1, "model.layers.0.weight", 3)
    assert a != derive_seed(2, "model.layers.0.weight", 2)
    assert 0 <= a < 2**63


def test_seeded_uniform_range_and_determinism():
    v = seeded_uniform(7, 0, 10_000)
    assert v.dtype == torch.float32 and v.shape == (10_000,)
    assert float(v.min()) >= 0.0 and float(v.max()) < 1.0
    assert abs(float(v.mean()) - 0.5) < 0.02
    assert torch.equal(v, seeded_uniform(7, 0, 10_000))
    assert not torch.equal(v, seeded_uniform(8, 0, 10_000))
    assert seeded_uniform(7, 5, 0).numel() == 0


def _random_splits(n: int, g: torch.Generator, parts: int) -> list[int]:
    cuts = sorted(set(int(c) for c in torch.randint(1, n, (parts,), generator=g)))
    return [0, *cuts, n]


@pytest.mark.parametrize("span", [1, 7, 64])
def test_seeded_uniform_any_split_concatenates_to_one_call_small_span(span, monkeypatch):
    monkeypatch.setattr(seeded_random, "SPAN", span)
    n = 1000
    whole = seeded_uniform(123, 0, n)
    g = torch.Generator().manual_seed(span)
    for trial in range(10):
        bounds = _random_splits(n, g, 1 + trial * 3)
        parts = [seeded_uniform(123, a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
        assert torch.equal(torch.cat(parts), whole)
    # boundary-hugging splits
    bounds = [0, span - 1, span, span + 1, 3 * span, n]
    bounds = sorted(set(b for b in bounds if 0 <= b <= n))
    assert torch.equal(torch.cat([seeded_uniform(123, a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]), whole)
    # an offset window equals the slice of the whole stream
    assert torch.equal(seeded_uniform(123, 333, 222), whole[333:555])


def test_seeded_uniform_split_across_real_span_boundary():
    S = seeded_random.SPAN
    assert S == 1 << 32
    whole = seeded_uniform(5, S - 1000, 2000)
    for bounds in ([S - 1000, S, S + 1000], [S - 1000, S - 1, S + 1, S + 1000]):
        parts = [seeded_uniform(5, a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
        assert torch.equal(torch.cat(parts), whole)
    # the next span has a key of its own: not the first span's values again
    assert not torch.equal(seeded_uniform(5, S, 1000), seeded_uniform(5, 0, 1000))


def _triple32_reference(seed: int, p: int) -> int:
    """The generator written out in plain Python integers: triple32((p mod 2^32) XOR key), top 24 bits."""
    x = (p % 2**32) ^ (derive_seed(seed, p // 2**32) & 0xFFFFFFFF)
    for shift, mult in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB), (14, None)):
        x ^= x >> shift
        if mult:
            x = (x * mult) & 0xFFFFFFFF
    return x >> 8


@pytest.mark.parametrize("offset", [0, 1000, 2**31 - 3, 2**32 - 2, 3 * 2**32 + 5])
def test_seeded_uniform_is_triple32_of_position_xor_key(offset):
    v = seeded_uniform(77, offset, 5)
    expected = [_triple32_reference(77, offset + i) / 2**24 for i in range(5)]
    assert v.tolist() == expected


def test_keep_mask_is_uniform_below_density_exactly():
    u = seeded_uniform(3, 10, 50_000)
    for density in (0.0, 1e-9, 0.3, 0.5, 1 - 2**-25, 1.0):
        mask = seeded_random.keep_mask(3, 10, 50_000, density)
        assert mask.dtype == torch.float32
        assert torch.equal(mask, (u.double() < density).float())
    # a value exactly at the density is dropped (u < density, not <=)
    at = float(u[7])
    assert seeded_random.keep_mask(3, 17, 1, at).item() == 0.0
    assert seeded_random.keep_mask(3, 17, 1, math.nextafter(at, 1)).item() == 1.0


def test_seeded_uniform_has_no_neighbour_correlation():
    u = seeded_uniform(11, 0, 1 << 18).double()
    assert abs(float(u.mean()) - 0.5) < 0.003
    for lag in (1, 2, 256):
        assert abs(float(torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1])) < 0.01
    # two streams at the same positions are uncorrelated too
    w = seeded_uniform(12, 0, 1 << 18).double()
    assert abs(float(torch.corrcoef(torch.stack([u, w]))[0, 1])) < 0.01


# ----------------------------------------------------------------------------------------------------------------------
# passthrough / copy
# ----------------------------------------------------------------------------------------------------------------------


def test_passthrough_copy():
    x = torch.tensor([[1.5, -2.0], [0.0, 3.0]])
    out = run_whole(PASSTHROUGH, [x], None, {}, [{"scale": None}])
    assert torch.equal(out, x)
    out = run_whole(PASSTHROUGH, [x], None, {}, [{}])
    assert torch.equal(out, x)
    out = run_whole(PASSTHROUGH, [x], None, {}, [{"scale": 1.0}])
    assert torch.equal(out, x)


def test_passthrough_scale():
    x = T(1.5, -2.0, 0.0, 3.0)
    before = x.clone()
    out = run_whole(PASSTHROUGH, [x], None, {}, [{"scale": 2.0}])
    assert torch.equal(out, T(3, -4, 0, 6))
    out = run_whole(PASSTHROUGH, [x], None, {}, [{"scale": -0.5}])
    assert torch.equal(out, T(-0.75, 1, 0, -1.5))
    out = run_whole(PASSTHROUGH, [x], None, {}, [{"scale": 0.0}])
    assert torch.equal(out.abs(), T(0, 0, 0, 0))
    assert torch.equal(x, before)


def test_passthrough_declares_one_input_and_optional_scale():
    assert PASSTHROUGH.max_inputs == 1
    assert PASSTHROUGH.param("scale").default is None
    assert PASSTHROUGH.param("scale").scope == "input"


def test_copy_returns_first_input():
    x = torch.tensor([1, 2, 3], dtype=torch.int64)
    assert torch.equal(COPY.merge(MergeInputs("t", [x, x + 1], None, {}, [{}, {}], 0, 3)), x)
