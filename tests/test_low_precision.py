"""bfloat16/float16 compute as mergekit's: where a config says `dtype: bfloat16` (or float16), the TIES/DARE/task
arithmetic family rounds where mergekit's op-by-op arithmetic in that dtype rounds (task_arithmetic._merge_rounded);
`--float32-compute` opts into float32 arithmetic rounded once. Hand-worked cases on planted values."""

from __future__ import annotations

import pytest
import torch
from conftest import write_config

from mergeedit.merging import executor
from mergeedit.merging.merge import MergeOptions, load_plan
from mergeedit.merging.methods import METHODS
from mergeedit.merging.methods.spec import MergeInputs
from mergeedit.merging.methods.task_arithmetic import _float32_sum, rescale_factor, round_to

LOW = [torch.bfloat16, torch.float16]


def _inputs(base, xs, weights, dtype, density=1.0, **shared):
    tensors = [torch.tensor(v, dtype=dtype) for v in (base, *xs)]
    per_input = [{}] + [{"weight": w, "density": density} for w in weights]
    params = {"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False, **shared}
    return MergeInputs("t", tensors, 0, params, per_input, numel=tensors[0].numel())


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_float32_sum_is_torchs_sum_over_the_model_axis(dtype, n):
    """What _float32_sum claims: torch's sum over the first axis of a stacked bf16/fp16 tensor (mergekit's
    deltas.sum(dim=0)) is the float32 running sum in model order, rounded once. The precondition: adding in the dtype
    (rounding after each addition) gives other bits here, so the check can fail."""
    g = torch.Generator().manual_seed(n)
    parts = [(torch.randn(4096, generator=g) * 10 ** torch.randint(-3, 1, (4096,), generator=g)).to(dtype) for _ in range(n)]
    stacked = torch.stack(parts).sum(dim=0)
    assert torch.equal(_float32_sum(parts).to(dtype), stacked)
    if n > 2:
        rounded_each_time = parts[0].clone()
        for p in parts[1:]:
            rounded_each_time = rounded_each_time + p
        assert not torch.equal(rounded_each_time, stacked)


def test_ties_elects_the_sign_from_the_bfloat16_sum():
    """base 2^-9, models 1.0 and -1.0, weights 1: the deltas 1 - 2^-9 and -1 - 2^-9 round to 1.0 and -1.0 in bfloat16
    (half an ulp: to even), whose sum 0 elects +, so the kept delta is 1.0 and base + 1.0 = 1 + 2^-9 rounds to 1.0.
    In float32 the sum -2^-8 elects - and the result is base - 1 - 2^-9 = -1.0."""
    base = 2.0 ** -9
    inputs = _inputs([base], [[1.0], [-1.0]], [1.0, 1.0], torch.bfloat16)
    assert torch.equal(METHODS["ties"].merge(inputs), torch.tensor([1.0], dtype=torch.bfloat16))
    as_float32 = _inputs([base], [[1.0], [-1.0]], [1.0, 1.0], torch.float32)
    assert torch.equal(METHODS["ties"].merge(as_float32), torch.tensor([-1.0]))


def test_weights_round_to_the_dtype_and_each_step_rounds():
    """task_arithmetic in float16, base 0, one model at 1.0, weight 0.1, lambda 3: mergekit's weight tensor holds
    fp16(0.1) = 0.0999755859375, so the weighted delta is that; times lambda (in float32) it is 0.2999267578125, exactly
    between two float16 values (1228.5 steps of 2^-12): to even, 0.2998046875. Computed in float32 and rounded once,
    0.1 * 3 = 0.300000012 rounds to 0.300048828125 instead."""
    out = METHODS["task_arithmetic"].merge(_inputs([0.0], [[1.0]], [0.1], torch.float16, **{"lambda": 3.0}))
    w = round_to(0.1, torch.float16)
    assert w == 0.0999755859375
    assert out.item() == round_to(w * 3.0, torch.float16) == 0.2998046875
    precise = METHODS["task_arithmetic"].merge(_inputs([0.0], [[1.0]], [0.1], torch.float32, **{"lambda": 3.0}))
    assert round_to(precise.item(), torch.float16) == 0.300048828125  # the precondition: the two differ here


def test_normalize_divides_by_the_rounded_weight_sum():
    """linear-free check of the non-consensus divisor: weights 0.1 + 0.2 in bfloat16 are 0.10009765625 + 0.2001953125
    = 0.30029296875 in float32, rounded to bf16 0.30078125; the delta 1.0 * w_a / that, with b's delta 0."""
    inputs = _inputs([0.0], [[1.0], [0.0]], [0.1, 0.2], torch.bfloat16, normalize=True)
    out = METHODS["task_arithmetic"].merge(inputs).item()
    wa = round_to(0.1, torch.bfloat16)
    divisor = round_to(wa + round_to(0.2, torch.bfloat16), torch.bfloat16)
    assert divisor == 0.30078125
    assert out == round_to(wa / divisor, torch.bfloat16)


class _Norms:
    rescale = True

    def __init__(self, before, after):
        self.before, self.after = {0: before}, {0: after}

    def scale(self, j):
        return self.before[j] / self.after[j]


def test_rescale_factor_rounds_each_norm_then_the_quotient():
    """mergekit's bf16 rescale: before and after are bf16 scalars (3.0 and 1.7 -> 1.703125), their quotient is taken in
    float32 and rounded to bf16 (1.76146789 -> 1.7578125; the unrounded norms' quotient would give 1.765625). float16 DARE/DELLA work in float32 in mergekit; the
    magnitude sparsifiers stay in float16."""
    stats = _Norms(3.0, 1.7)
    assert rescale_factor(stats, 0, torch.float32) == 3.0 / 1.7
    assert rescale_factor(stats, 0, torch.bfloat16) == round_to(3.0 / 1.703125, torch.bfloat16) == 1.7578125
    assert round_to(3.0 / 1.7, torch.bfloat16) == 1.765625  # the precondition: rounding the norms first matters here
    assert rescale_factor(stats, 0, torch.float16) == round_to(3.0 / round_to(1.7, torch.float16), torch.float16)
    f32 = torch.tensor(3.0, dtype=torch.float32) / torch.tensor(1.7, dtype=torch.float32)
    assert rescale_factor(stats, 0, torch.float16, upcasts_float16=True) == f32.item()
    assert rescale_factor(_Norms(5e-8, 1.0), 0, torch.bfloat16) == 1.0  # below mergekit's eps: left unscaled


def _plan_dtypes(tmp_path, models, method, extra, **options):
    text = f"merge_method: {method}\nbase_model: {models['base']}\nparameters: {{weight: 0.5}}\nmodels:\n  - model: {models['a']}\n{extra}"
    plan = load_plan(write_config(tmp_path, text), MergeOptions(**options))
    t = next(t for t in plan.tensors if t.method.name == method)
    return t.compute_dtype, t.out_dtype


def test_compute_dtype_follows_mergekit_and_float32_compute_opts_out(tmp_path, models):
    """ties in a bfloat16 config computes in bfloat16 (mergekit computes that family in the dtype); linear computes in
    float32 (mergekit's linear upcasts); --float32-compute makes ties compute in float32 too. Outputs stay bf16."""
    assert _plan_dtypes(tmp_path, models, "ties", "dtype: bfloat16\n") == (torch.bfloat16, torch.bfloat16)
    assert _plan_dtypes(tmp_path, models, "ties", "dtype: float16\n") == (torch.float16, torch.float16)
    assert _plan_dtypes(tmp_path, models, "ties", "dtype: bfloat16\n", float32_compute=True) == (torch.float32, torch.bfloat16)
    assert _plan_dtypes(tmp_path, models, "linear", "dtype: bfloat16\n") == (torch.float32, torch.bfloat16)
    assert _plan_dtypes(tmp_path, models, "ties", "dtype: float32\n") == (torch.float32, torch.float32)


def _reference_ties(base, xs, weights, densities, dtype, normalize):
    """TIES as mergekit defines it, written plainly with torch ops in `dtype` on whole tensors: delta, top-k magnitude
    (exactly k; tied magnitudes as mergekit's argsort(w.float(), descending=True)[:k] takes them), a weight tensor of
    the dtype, the sign of the sum over models, the agreeing sum, the agreeing weights' sum, base + delta."""
    base = base.to(dtype)
    deltas = []
    for x, density in zip(xs, densities):
        d = x.to(dtype) - base
        k = max(1, int(density * d.numel()))
        order = torch.argsort(d.abs().reshape(-1).float(), descending=True)[:k]
        mask = torch.zeros(d.numel(), dtype=dtype)
        mask[order] = 1
        deltas.append(d * mask.view(d.shape))
    deltas = torch.stack(deltas)
    w = torch.tensor(weights, dtype=dtype).view(-1, *([1] * base.dim()))
    deltas = deltas * w
    majority = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1
    agree = deltas.sign() == majority
    mixed = (deltas * agree).sum(dim=0)
    if normalize:
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return base + mixed


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("normalize", [False, True])
def test_ties_merge_equals_the_plain_definition_in_the_dtype(dtype, normalize, models, tmp_path):
    """The issue's case (ties, int8_mask, two models at densities 0.4 / 0.6) through the planner and executor, with a
    budget that cuts tensors into row chunks: every output tensor is bit-equal to the plain definition computed in the
    dtype. The precondition: the float32-compute merge (--float32-compute) differs somewhere, so the case can fail."""
    from safetensors.torch import load_file

    from mergeedit.merging.merge import write_merge

    text = (
        f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['a']}\n    parameters: {{weight: 0.7, density: 0.4}}\n"
        f"  - model: {models['b']}\n    parameters: {{weight: 0.45, density: 0.6}}\n"
        f"parameters: {{int8_mask: true, normalize: {str(normalize).lower()}}}\ndtype: {dtype}\n"
    )
    cfg = write_config(tmp_path, text)
    outs = {}
    for label, float32_compute in (("native", False), ("float32", True)):
        opts = MergeOptions(memory_budget=20_000, fsync=False, float32_compute=float32_compute)
        plan = load_plan(cfg, opts)
        assert sum(len(s.chunks) > 1 for s in executor.schedule_plan(plan, opts.memory_budget)) > 3  # row chunks
        write_merge(plan, tmp_path / label, opts)
        outs[label] = {k: v for f in sorted((tmp_path / label).glob("*.safetensors")) for k, v in load_file(f).items()}
    inputs = {key: {k: v for f in sorted(models[key].glob("*.safetensors")) for k, v in load_file(f).items()} for key in ("base", "a", "b")}
    torch_dtype = getattr(torch, dtype)
    differs = 0
    for name, got in outs["native"].items():
        want = _reference_ties(inputs["base"][name], [inputs["a"][name], inputs["b"][name]], [0.7, 0.45], [0.4, 0.6], torch_dtype, normalize)
        assert torch.equal(got, want), name
        differs += int((outs["float32"][name] != got).sum())
    assert differs > 0
