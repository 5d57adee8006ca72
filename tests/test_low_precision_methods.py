"""bfloat16/float16 compute as mergekit's for nuslerp, multislerp, karcher, model_stock, arcee_fusion and sce's
variance (methods/lowp.py): each method, streamed in blocks, gives the bits of a plain whole-tensor reference written
from mergekit's op order in the dtype, where every reduction is the exact total rounded as torch rounds its float32
total (karcher's float32 norms, never rounded to the dtype, follow torch's own order instead). The first test pins that reduction rule to torch's own on planted values whose float32 sums are exact, so it
holds on any processor. Each reference case also asserts its precondition: computing in float32 and rounding once
gives other bits, so rounding where mergekit rounds is what the comparison checks."""

from __future__ import annotations

import pytest
import torch
from method_harness import observed_statistics, per_input_params, run_blocked, run_whole, shared_params

from mergeedit.merging.methods import METHODS
from mergeedit.merging.methods.lowp import float32_sum, round_norm, round_total
from mergeedit.merging.methods.norm_order import torch_norm
from mergeedit.merging.methods.sce import variance_bits
from mergeedit.merging.methods.softmax import torch_softmax

LOW = [torch.bfloat16, torch.float16]
CUTS = [[], [1, 257, 1000], [333, 334, 2047]]  # block boundaries of the flattened 32 x 64 tensor


def _sum(x: torch.Tensor, dim=None, dtype=None) -> torch.Tensor:
    """A torch reduction of a bf16/fp16 tensor by the rule lowp.py applies: the exact total, rounded once (to `dtype`,
    default x's)."""
    wide = x.to(torch.float64)
    return round_total(wide.sum() if dim is None else wide.sum(dim=dim, keepdim=True), dtype or x.dtype)


def _norm(x: torch.Tensor, dim=None) -> torch.Tensor:
    wide = x.to(torch.float64).square()
    return round_norm(wide.sum() if dim is None else wide.sum(dim=dim, keepdim=True), x.dtype)


def _models(dtype, n=3, shape=(32, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.05
    return [base.to(dtype)] + [(base + torch.randn(shape, generator=g) * 0.01 * (i + 1)).to(dtype) for i in range(n)]


def _check(method, tensors, base, shared, per_input, reference, dtype, row_cuts=((), (64, 640), (1024,))):
    """Whole and blocked runs equal the reference bit for bit; the float32-once result differs (the precondition).
    row_cuts: block boundaries at whole rows, for a method that is not elementwise."""
    m = METHODS[method]
    for cuts in CUTS if m.elementwise else row_cuts:
        got = run_blocked(m, tensors, base, shared, per_input, cuts) if cuts else run_whole(m, tensors, base, shared, per_input)
        assert got.dtype == reference.dtype or method == "arcee_fusion"
        assert torch.equal(got.to(dtype), reference), (method, dtype, cuts, int((got.to(dtype) != reference).sum()))
    once = run_whole(m, [t.to(torch.float32) for t in tensors], base, shared, per_input).to(dtype)
    assert not torch.equal(once, reference)


@pytest.mark.parametrize("dtype", LOW)
def test_torch_reductions_round_the_exact_total(dtype):
    """The reduction rule, pinned to torch on planted values: multiples of 2^-6 in [-2, 2], 256 of them, so every
    float32 partial sum of squares and products is exact whatever order torch adds in; the totals (and the norm, a
    square root) are then rounded once to the dtype, which is what torch.sum / norm / dot / var return."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-128, 129, (256,), generator=g) / 64).to(dtype)
    y = (torch.randint(-128, 129, (256,), generator=g) / 64).to(dtype)
    assert torch.equal(x.to(torch.float64), (x.to(torch.float64) * 64).round() / 64)  # the planted grid survived
    assert torch.equal(torch.norm(x), _norm(x))
    assert torch.equal(x.sum(), _sum(x))
    assert torch.equal(torch.dot(x, y), _sum(x.to(torch.float32) * y.to(torch.float32), dtype=dtype))
    assert torch.equal((x * y).sum(), _sum(x * y))
    rows = torch.stack([x, y])
    assert torch.equal(torch.norm(rows, dim=-1, keepdim=True), _norm(rows, dim=-1))
    assert torch.equal(torch.var(rows, dim=0, unbiased=False), variance_bits(rows).view(torch.float32).to(dtype))
    assert torch.equal(torch.stack([x, y, x]).sum(0), float32_sum([x, y, x]))
    assert float(torch.norm(x)) != float(x.to(torch.float64).square().sum().sqrt())  # the norm was rounded


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", ["flatten", "rows", "columns"])
def test_nuslerp_rounds_as_mergekit(dtype, mode):
    base, a, b = _models(dtype, 2)
    shared = shared_params(METHODS["nuslerp"], nuslerp_flatten=mode == "flatten", nuslerp_row_wise=mode == "columns")
    per_input = per_input_params(3, 0, weight=[None, 0.3, 0.9])
    t = 0.9 / 1.2
    v0, v1 = a - base, b - base
    if mode == "columns":
        v0, v1 = v0.T, v1.T
    if mode == "flatten":
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    v0_u = v0 / _norm(v0, dim=-1).clamp(min=1e-7)
    v1_u = v1 / _norm(v1, dim=-1).clamp(min=1e-7)
    cos = _sum(v0_u * v1_u, dim=-1).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if mode == "columns":
        result = result.T
    reference = base + result.reshape(base.shape)
    _check("nuslerp", [base, a, b], 0, shared, per_input, reference, dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_rounds_as_mergekit(dtype, normalize):
    base, *xs = _models(dtype, 3)
    shared = shared_params(METHODS["multislerp"], normalize_weights=normalize)
    per_input = per_input_params(4, 0, weight=[None, 0.6, 0.3, 0.5])
    tvs = torch.stack(xs).reshape(3, -1) - base.reshape(-1)
    w = torch.tensor([0.6, 0.3, 0.5], dtype=dtype)
    if normalize:
        w = w / w.sum()
    norms = _norm(tvs, dim=-1)
    units = tvs / (norms + 1e-8)
    mean = float32_sum(list(units * w.view(-1, 1)))
    mean = mean / _norm(mean)
    dots = _sum(units * mean, dim=-1)
    tangent = float32_sum(list((units - dots * mean) * w.view(-1, 1)))
    tangent_norm = _norm(tangent) + 1e-8
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * float32_sum(list((norms.squeeze(-1) * w).unsqueeze(-1)))[0]
    reference = result.view(base.shape) + base
    _check("multislerp", [base, *xs], 0, shared, per_input, reference, dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_rounds_as_mergekit(dtype, filter_wise):
    w0, *ws = _models(dtype, 3)
    shared = shared_params(METHODS["model_stock"], filter_wise=filter_wise)
    dim = -1 if filter_wise else None
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(3):
        for j in range(i + 1, 3):
            product = _norm(offsets[i], dim) * _norm(offsets[j], dim)
            cosines.append((_sum(offsets[i] * offsets[j], dim) / product.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    t = (3 * cos) / (1 + 2 * cos)
    reference = t * ((ws[0] + ws[1] + ws[2]) / 3) + (1 - t) * w0
    _check("model_stock", [w0, *ws], 0, shared, [{} for _ in range(4)], reference, dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(32, 64), (29, 61)])
def test_karcher_rounds_as_mergekit(dtype, shape):
    """mergekit's loop: float32 norms (torch.linalg.norm of a float32 tensor, in torch's order: torch_norm, pinned to
    torch in tests/test_norm_order.py), units and every update rounded to the dtype. Rows of 61 put the block
    boundaries off torch's 8-element lanes, so the streamed norms carry the lanes across blocks."""
    tensors = _models(dtype, 2, shape)
    shared = shared_params(METHODS["karcher"])
    tol, alphas = shared["tol"], [1 / 3] * 3
    norms = [torch_norm(x) for x in tensors]
    exact = [x.to(torch.float64).square().sum().sqrt().to(torch.float32) for x in tensors]
    assert any(n != e for n, e in zip(norms, exact))  # torch's order is not the correctly rounded norm here
    units = [(x / n).to(dtype) for x, n in zip(tensors, norms)]
    mean = torch.zeros_like(units[0])
    for u in units:
        mean += (1 / 3) * u
    mean = (mean / torch_norm(mean)).to(dtype)
    iterations = 0
    for _ in range(int(shared["max_iter"])):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = torch.clamp(_sum(mean.to(torch.float32) * u.to(torch.float32), dtype=dtype), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += (1 / 3) * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch_norm(tangent)
        if tn.item() < tol:
            break
        iterations += 1
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(dtype)
        mean = (mean / torch_norm(mean)).to(dtype)
    assert iterations >= 2  # the streamed passes replay several updates
    reference = sum(a * n for a, n in zip(alphas, norms)) * mean
    row = shape[1]
    _check("karcher", tensors, None, shared, [{} for _ in range(3)], reference, dtype, ((), (row, 10 * row), (16 * row,)))


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """F.softmax of a bf16/fp16 tensor as an AVX-512 CPU computes it (a float32 softmax rounded once to the dtype;
    tests/test_softmax.py pins torch_softmax to it)."""
    return torch_softmax(x.float(), reduced=True).to(x.dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_arcee_fusion_importances_round_as_mergekit(dtype):
    base, x = _models(dtype, 1, shape=(32, 64), seed=4)
    x = x + (torch.arange(64) == 5).to(dtype) * 0.5  # a planted outlier column: some entries are kept
    p = _softmax(x) + 1e-8
    q = _softmax(base) + 1e-8
    importance = (x - base).abs() * _sum(p * torch.log(p / q), dim=-1)
    ordered = torch.sort(importance.reshape(-1)).values
    n = ordered.numel()
    q1, median, q3 = ordered[(n - 1) // 4], ordered[(n - 1) // 2], ordered[3 * (n - 1) // 4]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    assert 0 < int(mask.sum()) < n  # the precondition: a real selection
    reference = (base + (x - base) * mask).to(dtype)  # mergekit's float32 result, written in the dtype
    _check("arcee_fusion", [base, x], 0, {}, [{}, {}], reference, dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_sce_keeps_exactly_k_with_ties_as_mergekits_topk(dtype):
    """Variances tied at the selection boundary (planted: equal task-vector spreads): exactly k kept, as mergekit's
    topk keeps k; the tied ones kept are those its topk over the whole tensor keeps, however the tensor is cut."""
    n = 64
    base = torch.zeros(n, dtype=dtype)
    spread = torch.where(torch.arange(n) < 16, 2.0, 1.0)
    spread[40:] = 0.5  # positions 0..15: the largest variance, 16..39: the tied boundary value, 40..63: below
    a, b = (base + spread * 0.25).to(dtype), (base - spread * 0.25).to(dtype)
    m = METHODS["sce"]
    shared = shared_params(m, select_topk=0.5)  # k = 32 of 64 nonzero variances: 16 above, 16 of the 24 tied
    for cuts in ([], [7, 20, 33], [30]):
        blocks, stats = observed_statistics(m, [base, a, b], shared, cuts, dtype)
        kept = torch.cat([stats.apply_selection(torch.stack([blk.tensors[1], blk.tensors[2]]), blk.offset)[0] != 0 for blk in blocks])
        assert stats.ties_pass and int(kept.sum()) == 32, cuts
        var = torch.var(torch.stack([a - base, b - base]), dim=0, unbiased=False)  # mergekit's sce_mask
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.topk(var.abs().view(-1), k=32, largest=True).indices] = True
        assert kept[:16].all() and not kept[40:].any() and torch.equal(kept, expected), cuts
