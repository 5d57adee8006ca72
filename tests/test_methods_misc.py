"""ram, ramplus_tl, nearswap and arcee_fusion (mergekit 0.1.5 semantics), driven the way the executor drives them.

Expected numbers are worked out by hand (dyadic values, so float32 is exact) or come from plain whole-tensor reference
formulas written here from the method definitions, never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import write_config
from method_harness import T, rand_models, run_blocked, run_whole, shared_params

from mergeedit.core.errors import MergeEditError
from mergeedit.merging.methods import METHODS, arcee_fusion
from mergeedit.merging.methods.arcee_fusion import ARCEE_FUSION
from mergeedit.merging.methods.nearswap import NEARSWAP
from mergeedit.merging.methods.quantiles import ExactOrderStatistics, key_to_value, order_keys
from mergeedit.merging.methods.ram import RAM, RAMPLUS_TL
from mergeedit.merging.methods.softmax import torch_softmax
from mergeedit.models.toy import load_state_dict


# ---- plain references ---------------------------------------------------------------------------------------------
def ram_reference(base, xs, epsilon=1e-5, r=None, alpha=None):
    """RAM on stacked task vectors; with r/alpha, RAM+ (tensor-local): unique entries scaled per model."""
    tv = torch.stack([x - base for x in xs]).reshape(len(xs), -1)
    nz = tv.abs() > epsilon
    count = nz.sum(0)
    unique, overlap = count == 1, count > 1
    lam = torch.ones(len(xs))
    if r is not None:
        for i in range(len(xs)):
            shared_i = int((nz[i] & overlap).sum())
            unique_i = int((nz[i] & unique).sum())
            lam[i] = 1 + r * min(max(shared_i / max(unique_i, epsilon), 0), alpha)
    tvz = tv * nz
    merged = (tvz * unique * lam[:, None] + tvz * overlap / count.clamp(min=1)).sum(0)
    return base + merged.reshape(base.shape)


def nearswap_reference(base, other, t):
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * other + (1 - w) * base


def _softmax(x):
    """F.softmax over the last dim as an AVX-512 CPU computes it (tests/test_softmax.py pins torch_softmax to it)."""
    return torch_softmax(x.reshape(-1, x.shape[-1])).view(x.shape)


def arcee_reference(base, x):
    """mergekit's definition on the whole tensor, with the softmax above and the KL's row sum in float64 rounded once
    to float32: row KL over the last dim, quantiles at sorted[floor(q * (n - 1))]."""
    p = _softmax(x) + 1e-8
    q = _softmax(base) + 1e-8
    importance = (x - base).abs() * (p * torch.log(p / q)).double().sum(dim=-1, keepdim=True).float()
    ordered = torch.sort(importance.reshape(-1)).values
    n = ordered.numel()
    q1, med, q3 = ordered[(n - 1) // 4], ordered[(n - 1) // 2], ordered[3 * (n - 1) // 4]
    keep = importance >= med + 1.5 * (q3 - q1)
    return base + (x - base) * keep


def per_input(n):
    return [{} for _ in range(n)]


def sparse_models(n_models, numel, seed, changed=0.4):
    """base plus models that change a random `changed` fraction of entries (the rest differ by at most 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    out = [base]
    for _ in range(n_models):
        mask = torch.rand(numel, generator=g) < changed
        tiny = (torch.rand(numel, generator=g) - 0.5) * 2e-6
        out.append(base + torch.where(mask, torch.randn(numel, generator=g) * 0.1, tiny))
    return out


# ---- registry and parameters --------------------------------------------------------------------------------------
def test_registered_with_mergekit_names_and_defaults():
    assert METHODS["ram"] is RAM and METHODS["ramplus_tl"] is RAMPLUS_TL
    assert METHODS["nearswap"] is NEARSWAP and METHODS["arcee_fusion"] is ARCEE_FUSION
    assert {p.name: p.default for p in RAM.params} == {"epsilon": 1e-5}
    assert {p.name: p.default for p in RAMPLUS_TL.params} == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    assert [(p.name, p.scope, p.required) for p in NEARSWAP.params] == [("t", "shared", True)]
    assert ARCEE_FUSION.params == ()
    for m in (RAM, RAMPLUS_TL, NEARSWAP, ARCEE_FUSION):
        assert m.base_model == "required"
    assert (NEARSWAP.min_inputs, NEARSWAP.max_inputs) == (2, 2)
    assert (ARCEE_FUSION.min_inputs, ARCEE_FUSION.max_inputs) == (2, 2)
    assert not ARCEE_FUSION.elementwise and not ARCEE_FUSION.randomized


# ---- nearswap -----------------------------------------------------------------------------------------------------
def test_nearswap_hand_worked():
    base = T(0.0, 0.0, 0.0, 3.0, 1.0)
    other = T(0.125, 1.0, -2.0, 3.0, 1.25)
    # |d| 0.125 < t: w=1 -> other; |d| 1: w=0.25; |d| 2: w=0.125; equal: other (= base); |d| 0.25 = t: w=1
    out = run_whole(NEARSWAP, [other, base], 1, {"t": 0.25}, per_input(2))
    assert torch.equal(out, T(0.125, 0.25, -0.25, 3.0, 1.25))


def test_nearswap_base_is_a_not_b():
    """Swapping which model is the base changes the result: the output starts from the base."""
    a, b = T(0.0), T(4.0)
    assert torch.equal(run_whole(NEARSWAP, [a, b], 0, {"t": 1.0}, per_input(2)), T(1.0))
    assert torch.equal(run_whole(NEARSWAP, [a, b], 1, {"t": 1.0}, per_input(2)), T(3.0))


@pytest.mark.parametrize("t", [0.0, 1e-9, 0.5])
def test_nearswap_equal_inputs_give_no_nan(t):
    x = torch.randn(100)
    out = run_whole(NEARSWAP, [x, x.clone()], 0, {"t": t}, per_input(2))
    assert not out.isnan().any()
    torch.testing.assert_close(out, x, rtol=1e-6, atol=0)  # w * x + (1 - w) * x, rounded


def test_nearswap_matches_reference_blocked_and_whole():
    base, other = rand_models(1, 5000, seed=3)
    other[::7] = base[::7]  # some exactly equal entries
    ref = nearswap_reference(base, other, 0.3)
    whole = run_whole(NEARSWAP, [base, other], 0, {"t": 0.3}, per_input(2))
    blocked = run_blocked(NEARSWAP, [base, other], 0, {"t": 0.3}, per_input(2), cuts=[1, 999, 1000, 4321])
    assert torch.equal(whole, ref) and torch.equal(blocked, whole)


# ---- ram / ramplus_tl ---------------------------------------------------------------------------------------------
def test_ram_hand_worked():
    base = torch.zeros(6)
    m1 = T(0.5, 0.0, 0.25, 1e-6, 0.0, -0.5)
    m2 = T(0.0, 0.75, 0.75, 0.0, 0.0, 0.0)
    m3 = T(0.0, 0.0, 0.5, 0.0, 0.0, 0.25)
    # unique -> whole delta; entry 2 changed by all three -> mean; 1e-6 is below epsilon; entry 5 shared by two
    out = run_whole(RAM, [base, m1, m2, m3], 0, shared_params(RAM), per_input(4))
    assert torch.equal(out, T(0.5, 0.75, 0.5, 0.0, 0.0, -0.125))


def test_ram_epsilon_is_strict_and_configurable():
    base, x = torch.zeros(3), T(0.25, 0.5, 1.0)
    out = run_whole(RAM, [base, x, x.clone()], 0, {"epsilon": 0.5}, per_input(3))
    assert torch.equal(out, T(0.0, 0.0, 1.0))  # |0.5| is not > 0.5


def test_ramplus_hand_worked():
    base = torch.zeros(8)
    m1 = T(1.0, 2.0, 3.0, 4.0, 0.5, 0.0, 0.0, 0.0)  # 4 unique, 1 shared: rho = 0.25
    m2 = T(0.0, 0.0, 0.0, 0.0, 1.5, 2.0, 0.0, 0.0)  # 1 unique, 1 shared: rho = 1
    out = run_whole(RAMPLUS_TL, [base, m1, m2], 0, {"r": 0.5, "alpha": 1.0, "epsilon": 1e-5}, per_input(3))
    # lambda1 = 1 + 0.5 * 0.25 = 1.125, lambda2 = 1 + 0.5 * min(1, 1) = 1.5; the shared entry is averaged
    assert torch.equal(out, T(1.125, 2.25, 3.375, 4.5, 1.0, 3.0, 0.0, 0.0))
    # defaults r 0.1, alpha 0.2: rho 0.25 and 1 both clip to 0.2, lambda = 1.02 for both
    out = run_whole(RAMPLUS_TL, [base, m1, m2], 0, shared_params(RAMPLUS_TL), per_input(3))
    torch.testing.assert_close(out, T(1.02, 2.04, 3.06, 4.08, 1.0, 2.04, 0.0, 0.0), rtol=0, atol=1e-6)


def test_ramplus_model_without_unique_entries_is_not_boosted():
    base = torch.zeros(4)
    m1, m2 = T(1.0, 1.0, 0.0, 0.0), T(1.0, 3.0, 2.0, 0.0)  # m1 has no unique entry: rho = 2 / epsilon
    out = run_whole(RAMPLUS_TL, [base, m1, m2], 0, {"r": 0.5, "alpha": 1.0, "epsilon": 1e-5}, per_input(3))
    assert torch.equal(out, T(1.0, 2.0, 3.0, 0.0))  # m2: 1 unique, 2 shared -> rho clips to 1, lambda 1.5


@pytest.mark.parametrize("method,extra", [(RAM, {}), (RAMPLUS_TL, {"r": 0.1, "alpha": 0.2}), (RAMPLUS_TL, {"r": 0.7, "alpha": 3.0})])
def test_ram_matches_reference_blocked_and_whole(method, extra):
    tensors = sparse_models(3, 6000, seed=11)
    shared = {**shared_params(method), **extra}
    ref = ram_reference(tensors[0], tensors[1:], shared["epsilon"], extra.get("r"), extra.get("alpha"))
    # base in the middle of the inputs: the method must use `base`, not position 0
    order = [tensors[1], tensors[0], tensors[2], tensors[3]]
    whole = run_whole(method, order, 1, shared, per_input(4))
    blocked = run_blocked(method, order, 1, shared, per_input(4), cuts=[5, 2048, 2049, 5999])
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-6)
    assert torch.equal(blocked, whole)


def test_ram_base_only_returns_base():
    base = torch.randn(10)
    for method in (RAM, RAMPLUS_TL):
        assert torch.equal(run_whole(method, [base], 0, shared_params(method), per_input(1)), base)


# ---- exact order statistics -----------------------------------------------------------------------------------------
def _select(values, ranks, cuts):
    sel = ExactOrderStatistics(values.numel(), ranks)
    bounds = [0, *cuts, values.numel()]
    for observe, end in ((sel.observe_first, sel.end_first), (sel.observe_second, sel.end_second)):
        for a, b in zip(bounds[:-1], bounds[1:]):
            observe(values[a:b])
        end()
    return sel.values


@pytest.mark.parametrize("n", [1, 7, 70_000])
def test_order_statistics_match_sort_with_signs_and_ties(n):
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    values[::5] = 0.0
    values[1::11] = -0.0
    values[2::13] = 1.5
    ranks = sorted({0, n // 3, (n - 1) // 2, n - 1})
    ordered = torch.sort(values).values
    assert _select(values, ranks, cuts=[n // 2] if n > 1 else []) == [float(ordered[r]) for r in ranks]


def test_order_keys_are_monotone_and_invertible():
    v = T(-float("inf"), -3.0, -1e-40, -0.0, 0.0, 1e-40, 2.0, float("inf"))
    keys = order_keys(v)
    assert bool((keys[1:] > keys[:-1]).all())
    assert [key_to_value(int(k)) for k in keys] == v.tolist()


# ---- arcee_fusion ---------------------------------------------------------------------------------------------------
def test_arcee_fusion_hand_worked_1d():
    """A 1-D tensor is one softmax row: importance = |d| * one KL, so the kept set follows |d| alone. Sorted |d| at
    positions 2, 4, 6 of 9 give q1 0.03, median 0.05, q3 0.07: threshold 0.05 + 1.5 * 0.04 = 0.11 (times the KL)."""
    base = torch.zeros(9)
    x = T(0.01, -0.02, 0.03, 0.04, -0.05, 0.06, 0.07, 0.08, -2.0)
    out = run_whole(ARCEE_FUSION, [base, x], 0, {}, per_input(2))
    assert torch.equal(out, T(0, 0, 0, 0, 0, 0, 0, 0, -2.0))


def test_arcee_fusion_keeps_everything_when_most_rows_are_unchanged():
    """Unchanged rows have KL 0, so over half the importances are 0: the threshold is 0 and every entry passes."""
    base = torch.zeros(4, 4)
    x = base.clone()
    x[0] = T(1.0, 0.0, 0.0, 0.0)
    out = run_whole(ARCEE_FUSION, [base, x], 0, {}, per_input(2))
    assert torch.equal(out, x)


def test_arcee_fusion_equal_inputs_give_the_input():
    x = torch.randn(8, 16)
    out = run_whole(ARCEE_FUSION, [x, x.clone()], 0, {}, per_input(2))
    assert torch.equal(out, x) and not out.isnan().any()


@pytest.mark.parametrize("shape", [(40, 24), (300, 256), (5000,), (3, 4, 16)])
def test_arcee_fusion_matches_reference_and_row_aligned_blocks(shape):
    """(300, 256) has more than 65536 entries, so the quantiles go through the two histogram passes.

    Most deltas are tiny (some rows then get a KL that rounding makes negative), but two entries of the first and the
    last row move by 0.5: those rows' KL is clearly positive (asserted, in float64) and their planted entries' importance
    dwarfs the quantile threshold, so some entries are kept and most are not, by construction on any processor."""
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g) * 0.02
    x = base + torch.randn(shape, generator=g) * 2e-4
    c = shape[-1]
    rows = x.numel() // c
    planted = torch.zeros(rows, c, dtype=torch.bool)
    planted[[0, rows - 1], :2] = True
    x.view(rows, c)[planted] += 0.5
    p, q = F.softmax(x.double().view(rows, c), -1), F.softmax(base.double().view(rows, c), -1)
    # the precondition, in float64: far above float32 rounding of the sum (p * log(p / q) is ~1e-7 relative per term)
    assert float((p * (p / q).log()).sum(-1)[[0, rows - 1]].min()) > 1e-5
    ref = arcee_reference(base, x)
    whole = run_whole(ARCEE_FUSION, [x, base], 1, {}, per_input(2))
    assert torch.equal(whole, ref)
    kept = ((whole == x) & (x != base)).view(rows, c)
    assert kept[planted].all() and int(kept.sum()) < x.numel() // 2
    if rows > 1:
        cuts = sorted({c, 2 * c, (rows // 2) * c, (rows - 1) * c})
        assert torch.equal(run_blocked(ARCEE_FUSION, [x, base], 1, {}, per_input(2), cuts=cuts), whole)


@pytest.mark.parametrize("group", [1, 100])
def test_arcee_fusion_row_groups_do_not_change_the_result(monkeypatch, group):
    """Chunks are worked through in groups of rows: any grouping (a lone row included) gives the same bits."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(40, 24, generator=g) * 0.02
    x = base + torch.randn(40, 24, generator=g) * 2e-4
    monkeypatch.setattr(arcee_fusion, "GROUP", group)
    assert torch.equal(run_whole(ARCEE_FUSION, [base, x], 0, {}, per_input(2)), arcee_reference(base, x))


@pytest.mark.parametrize("threads", [1, 2])
def test_arcee_fusion_kl_row_sum_is_the_exact_sum_rounded_once(threads):
    """Planted rows longer than torch's 32,768-element grain: a 1 then 40,000 logits of -16.7 against the base's
    mirror image. The KL's row sum is the sum of the float32 terms added in float64 in element order and rounded once to
    float32 (math.fsum, the exactly rounded float64 sum, gives the same float32 here), with 1 or 2 threads, and a row
    alone gives the bits it gets among others."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.full((3, 40_001), -16.7)
        x[:, 0] = 1.0
        x[1, 1::2] = -3.0  # another row, so rows differ
        base = x.flip(-1).contiguous()
        kl = arcee_fusion.row_kl(x, base)
        p, q = _softmax(x) + 1e-8, _softmax(base) + 1e-8
        terms = (p * torch.log(p / q)).double()
        exact = torch.tensor([math.fsum(row) for row in terms.tolist()], dtype=torch.float64).float()
        assert torch.equal(kl, exact) and torch.equal(arcee_fusion.row_kl(x[2:], base[2:]), kl[2:])
        assert float(exact.min()) > 0.01  # the precondition: rows that really differ from their base
    finally:
        torch.set_num_threads(before)


def test_arcee_fusion_refuses_a_block_that_cuts_a_row():
    base, x = torch.zeros(4, 8), torch.randn(4, 8)
    with pytest.raises(MergeEditError, match="whole rows of 8"):
        run_blocked(ARCEE_FUSION, [base, x], 0, {}, per_input(2), cuts=[12])


def test_arcee_fusion_is_reproducible():
    base, x = rand_models(1, 3000, seed=5)
    outs = [run_whole(ARCEE_FUSION, [base.reshape(30, 100), x.reshape(30, 100)], 0, {}, per_input(2)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


# ---- through the planner and executor -----------------------------------------------------------------------------
def _clean_error(result, *needles):
    assert result.code == 2, (result.code, result.stderr)
    message = " ".join(result.stderr.split())
    assert "Traceback" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_wrong_model_counts_are_clear_errors(tmp_path, models, run_cli):
    def listed(*keys):
        return "models:\n" + "".join(f"  - model: {models[k]}\n" for k in keys)

    base = f"base_model: {models['base']}\n"
    for method, params in (("nearswap", "parameters: {t: 0.1}\n"), ("arcee_fusion", "")):
        head = f"merge_method: {method}\n{params}"
        cfg = write_config(tmp_path, head + base + listed("a", "b"), f"{method}3.yaml")
        _clean_error(run_cli("merge", cfg, tmp_path / "out"), method, "at most 2", "list at most 2 models")
        cfg = write_config(tmp_path, head + base + listed("base"), f"{method}1.yaml")
        _clean_error(run_cli("merge", cfg, tmp_path / "out"), method, "at least 2")
        cfg = write_config(tmp_path, head + listed("a", "b"), f"{method}0.yaml")
        _clean_error(run_cli("merge", cfg, tmp_path / "out"), "needs a base model")
    cfg = write_config(tmp_path, "merge_method: nearswap\n" + base + listed("a"), "no_t.yaml")
    _clean_error(run_cli("merge", cfg, tmp_path / "out"), "'t'")
    cfg = write_config(tmp_path, "merge_method: ram\n" + listed("a"), "ram.yaml")
    _clean_error(run_cli("merge", cfg, tmp_path / "out"), "ram", "needs a base model")


@pytest.mark.parametrize("method,params", [("ramplus_tl", "parameters: {epsilon: 0.004, r: 0.5, alpha: 1.0}\n"), ("arcee_fusion", "")])
def test_chunked_merge_equals_whole_and_reference(tmp_path, models, run_cli, method, params):
    """A 10 KB budget cuts the matrices into row chunks: statistics passes then chunked merging give the same bytes."""
    others = ["a"] if method == "arcee_fusion" else ["a", "b", "c"]
    listed = "".join(f"  - model: {models[k]}\n" for k in others)
    cfg = write_config(tmp_path, f"merge_method: {method}\nbase_model: {models['base']}\n{params}models:\n{listed}")
    assert run_cli("merge", cfg, tmp_path / "whole").code == 0
    assert run_cli("merge", cfg, tmp_path / "chunked", "--memory-budget", "10K").code == 0
    whole, chunked = load_state_dict(tmp_path / "whole"), load_state_dict(tmp_path / "chunked")
    base = load_state_dict(models["base"])
    inputs = [load_state_dict(models[k]) for k in others]
    assert whole.keys() == chunked.keys()
    for name, out in whole.items():
        assert torch.equal(out, chunked[name]), name
        xs = [sd[name] for sd in inputs]
        if method == "arcee_fusion":
            expected = arcee_reference(base[name], xs[0])
        else:
            expected = ram_reference(base[name], xs, 0.004, 0.5, 1.0)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6, msg=name)


def test_ramplus_with_epsilon_zero_and_no_unique_entries_does_not_divide_by_zero():
    base = torch.tensor([0.0, 0.0, 0.0])
    same = torch.tensor([1.0, 2.0, 0.0])  # both models change the same entries: nothing is unique to either
    shared = shared_params(RAMPLUS_TL, epsilon=0.0)
    out = run_whole(RAMPLUS_TL, [base, same, same.clone()], 0, shared, per_input(3))
    assert torch.equal(out, torch.tensor([1.0, 2.0, 0.0]))  # shared entries are averaged
