"""Tied magnitudes at a top-k boundary are kept as mergekit keeps them: the positions its one whole-tensor torch call
puts among the k (ties: argsort descending, first k; breadcrumbs: sort ascending, the window n_bot .. n_bot + keep;
sce: topk of the variances), whole or cut into blocks anywhere, with 1 or 2 threads. Above TIE_ORDER_LIMIT elements
the tied values at the lowest positions are kept instead."""

from __future__ import annotations

import pytest
import torch
from method_harness import observed_statistics, per_input_params, run_blocked, run_whole, shared_params

from mergeedit.merging.methods import METHODS, selection
from mergeedit.merging.methods.sparsify import breadcrumb_counts

N = 200_000  # past the direct-selection size: the band or radix passes settle the threshold
CUTS = [[], [1, 77_777, 123_456], [50_000, 100_000, 150_000]]


def _planted(dtype: torch.dtype, seed: int = 3) -> torch.Tensor:
    """Magnitudes taking 64 levels (exact in bfloat16 and float16): every value is tied with ~3000 others."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(1, 65, (N,), generator=g).to(torch.float32) / 64
    return (levels * torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0)).to(dtype)


def _as_set(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask.reshape(-1)).reshape(-1)


def _straddles(w: torch.Tensor, k: int) -> None:
    """The precondition: the k-th largest is tied, with more tied values than places left for them."""
    thr = w.sort(descending=True).values[k - 1]
    greater, equal = int((w > thr).sum()), int((w == thr).sum())
    assert greater < k < greater + equal and equal - (k - greater) > 100


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_keeps_the_ties_mergekits_argsort_keeps(dtype, threads):
    x = _planted(dtype)
    base = torch.zeros(N, dtype=dtype)
    density = 0.4
    k = int(density * N)
    w = x.abs().float()
    _straddles(w, k)
    expected = torch.sort(torch.argsort(w, descending=True)[:k]).values  # mergekit's magnitude()
    assert not torch.equal(expected, torch.sort(torch.argsort(w, descending=True, stable=True)[:k]).values)  # not lowest-first
    m = METHODS["ties"]
    shared = {**shared_params(m), "normalize": False}
    pi = per_input_params(2, 0, weight=[None, 1.0], density=[None, density])
    for cuts in CUTS:
        out = run_blocked(m, [base, x], 0, shared, pi, cuts) if cuts else run_whole(m, [base, x], 0, shared, pi)
        assert torch.equal(_as_set(out != 0), expected), cuts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_breadcrumbs_keeps_mergekits_sort_window(dtype, threads):
    x = _planted(dtype, seed=4)
    base = torch.zeros(N, dtype=dtype)
    density, gamma = 0.5, 0.1
    skip, keep = breadcrumb_counts(density, gamma, N)
    n_bot = N - skip - keep
    w = x.abs().float()
    _straddles(w, skip)  # both boundaries fall inside tie groups
    _straddles(w, skip + keep)
    expected = torch.sort(torch.sort(w, descending=False).indices[n_bot : n_bot + keep]).values  # magnitude_outliers()
    m = METHODS["breadcrumbs"]
    shared = {**shared_params(m), "normalize": False}
    pi = per_input_params(2, 0, weight=[None, 1.0], density=[None, density], gamma=[None, gamma])
    for cuts in CUTS:
        out = run_blocked(m, [base, x], 0, shared, pi, cuts) if cuts else run_whole(m, [base, x], 0, shared, pi)
        assert torch.equal(_as_set(out != 0), expected), cuts


def _sce_kept(dtype: torch.dtype, cuts: list[int], n: int = N) -> torch.Tensor:
    """The positions sce's variance selection keeps, its statistics streamed over blocks cut at `cuts`."""
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(n, dtype=dtype)
    spread = (torch.randint(1, 33, (n,), generator=g).to(torch.float32) / 32).to(dtype)
    a, b = base + spread, base - spread  # variance = spread^2: 32 levels, each tied ~6000 times
    m = METHODS["sce"]
    shared = shared_params(m, select_topk=0.3)
    blocks, stats = observed_statistics(m, [base, a, b], shared, cuts, dtype)
    assert stats.ties_pass  # the precondition: the k-th largest variance is tied across the boundary
    kept = torch.cat([stats.apply_selection(torch.stack([blk.tensors[1], blk.tensors[2]]), blk.offset)[0] != 0 for blk in blocks])
    # mergekit's sce_mask, written out: population variance in the dtype, k = int(nonzero * select_topk), topk
    var = torch.var(torch.stack([a - base, b - base]), dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * 0.3)
    expected = torch.sort(torch.topk(var.abs().view(-1), k=k, largest=True).indices).values
    assert int(kept.sum()) == k
    return _as_set(kept), expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sce_keeps_the_ties_mergekits_topk_keeps(dtype, threads):
    for cuts in CUTS:
        kept, expected = _sce_kept(dtype, cuts)
        assert torch.equal(kept, expected), cuts


def test_above_the_limit_the_lowest_tied_positions_are_kept(monkeypatch):
    """A tensor of more than TIE_ORDER_LIMIT elements (a small limit patched in): exactly k kept, the tied values at
    the lowest positions, whole or cut."""
    monkeypatch.setattr(selection, "TIE_ORDER_LIMIT", N - 1)
    x = _planted(torch.bfloat16)
    base = torch.zeros(N, dtype=torch.bfloat16)
    density = 0.4
    k = int(density * N)
    w = x.abs().float()
    _straddles(w, k)
    lowest = torch.sort(torch.argsort(w, descending=True, stable=True)[:k]).values  # ties in element order
    m = METHODS["ties"]
    shared = {**shared_params(m), "normalize": False}
    pi = per_input_params(2, 0, weight=[None, 1.0], density=[None, density])
    for cuts in CUTS:
        out = run_blocked(m, [base, x], 0, shared, pi, cuts) if cuts else run_whole(m, [base, x], 0, shared, pi)
        assert torch.equal(_as_set(out != 0), lowest), cuts
    monkeypatch.setattr(selection, "TIE_ORDER_LIMIT", N)  # at the limit: mergekit's order again
    out = run_whole(m, [base, x], 0, shared, pi)
    assert torch.equal(_as_set(out != 0), torch.sort(torch.argsort(w, descending=True)[:k]).values)


def test_tie_order_working_memory_is_declared():
    order = selection.TieOrder("argsort", 1000)
    assert order.applies and order.nbytes == 1000 * selection.TIE_ORDER_BYTES_PER_ELEMENT
    assert selection.TieOrder("sort", selection.TIE_ORDER_LIMIT + 1).nbytes == 0  # above the limit: positions only


def test_dry_run_and_merge_report_the_tie_order_memory_outside_the_budget(tmp_path, models, run_cli):
    """The estimate counts the tie order's working memory (16 bytes an element of the largest tensor, per sparsified
    model); a budget below it gets one note line, and the merge still runs (the bytes do not depend on the budget:
    tests/test_split_invariance.py)."""
    from conftest import write_config

    from mergeedit.merging.merge import MergeOptions, estimate, load_plan

    cfg = write_config(tmp_path, f"""merge_method: ties
base_model: {models['base']}
models:
  - model: {models['a']}
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {models['b']}
    parameters: {{weight: 0.4, density: 0.6}}
parameters: {{int8_mask: true, normalize: false}}
dtype: bfloat16
""")
    plan = load_plan(cfg, MergeOptions(memory_budget=10_000))
    largest = max(t.numel for t in plan.tensors)
    assert estimate(plan, MergeOptions(memory_budget=10_000)).selection_bytes == 2 * 16 * largest
    dry = run_cli("merge", cfg, tmp_path / "out", "--memory-budget", "10K", "--dry-run")
    assert dry.code == 0 and "tie order: up to" in dry.stdout
    assert sum("outside --memory-budget" in line for line in (dry.stdout + dry.stderr).splitlines()) == 1
    roomy = run_cli("merge", cfg, tmp_path / "out", "--memory-budget", "1G", "--dry-run")
    assert "outside --memory-budget" not in roomy.stdout + roomy.stderr


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "sce"])
def test_merge_bytes_with_the_tie_order_do_not_depend_on_budget_or_threads(method, models, tmp_path, monkeypatch):
    """End to end in bfloat16 (ties at the boundary by the dozen): whole tensors with 1 thread, row chunks at two
    budgets with 2 and 1 threads, the same bytes; the precondition, that the tie order decided kept entries in every
    run, is asserted."""
    from conftest import write_config
    from test_split_invariance import CONFIGS, _merge

    calls = []
    kept_ties = selection.TieOrder.kept_ties
    monkeypatch.setattr(selection.TieOrder, "kept_ties", lambda self, *a: calls.append(self.call) or kept_ties(self, *a))
    head, tail = CONFIGS[method]
    text = f"merge_method: {method}\n{head}{tail}dtype: bfloat16\n"
    for key in ("base", "a", "b", "c"):
        text = text.replace(f"@{key}\n", f"{models[key]}\n")
    cfg = write_config(tmp_path, text)
    outputs = []
    for i, (budget, threads) in enumerate([(1 << 30, 1), (9_000, 2), (5_000, 1)]):
        calls.clear()
        cuts, files = _merge(cfg, tmp_path / f"out{i}", budget, None, threads, monkeypatch)
        assert bool(cuts) == (i > 0) and calls and set(calls) == {"topk" if method == "sce" else "argsort" if method == "ties" else "sort"}
        outputs.append(files)
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
