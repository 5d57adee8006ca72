"""The compiled (torch.compile) merge formula gives the eager code's bytes, bit for bit, for every variant it serves.

Compiling takes seconds per variant, so the cases share a few variants. Without a C++ compiler torch.compile cannot
build CPU kernels; those machines skip this module (the merge then stays eager, which every other test covers).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from method_harness import per_input_params, run_whole, shared_params

from mergeedit.merging.methods import METHODS, fused
from mergeedit.merging.methods import task_arithmetic as ta

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="torch.compile needs a C++ compiler for CPU kernels"
)

# (method, models, shared parameters, densities, weights): each line one variant, with its edge cases
CASES = [
    ("ties", 2, {}, [0.3, 0.5], [0.5, 0.5]),
    ("ties", 3, {"lambda": 0.7}, [0.2, 1.0, 0.6], [1.0, -0.4, 0.9]),  # a negative weight, a density of 1
    ("ties", 2, {"normalize": False, "rescale": True}, [0.5, 0.25], [0.3, 0.8]),
    ("dare_ties", 2, {}, [0.5, 0.3], [0.6, 0.7]),
    ("dare_linear", 2, {"normalize": True}, [0.4, 0.9], [0.25, 0.5]),
    ("task_arithmetic", 3, {"lambda": 1.3}, [1.0, 1.0, 1.0], [0.5, -1.0, 0.75]),
]


def _inputs(models: int, seed: int, n: int = 5000) -> list[torch.Tensor]:
    """base and fine-tunes, each a view 8 elements into its buffer as the executor's blocks are (see fused.fits)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    base[::11] = -0.0  # signs of zero must survive
    xs = [base + torch.randn(n, generator=g) * 0.01 for _ in range(models)]
    xs[0][::7] = base[::7]  # untouched entries: exact zero deltas
    if models > 1:
        xs[1][::5] = 2 * base[::5] - xs[0][::5]  # deltas that cancel exactly in the sign election
    return [torch.cat([torch.zeros(8), x])[8:] for x in [base] + xs]


def _merge(method_name, tensors, shared, densities, weights, eager: bool, monkeypatch, kernels=None) -> torch.Tensor:
    method = METHODS[method_name]
    n = len(tensors)
    per_input = per_input_params(n, 0, weight=[None] + weights, density=[None] + densities)
    with monkeypatch.context() as m:
        if not eager:  # eager: no compiler, as an executor with --kernels eager has none
            calls = []
            original = ta._merge_fused
            m.setattr(ta, "_merge_fused", lambda inputs, v: (calls.append(v), original(inputs, v))[1])
        out = run_whole(method, tensors, 0, shared_params(method, **shared), per_input, seed=3, kernels=None if eager else kernels)
        if not eager:
            assert calls, f"{method_name}: the fused kernel was not used"
    return out


@pytest.fixture(scope="module")
def compiled():
    """Request every variant of CASES through the methods' own warm-up, then wait for the compiler: once for this
    thread count, once for the executor's (compiled code is specific to torch's thread count)."""
    from method_harness import _complete, _probe

    from mergeedit.merging.executor import math_threads

    compiler = fused.KernelCompiler()
    before = torch.get_num_threads()
    for threads in (before, math_threads(with_statistics=True)):
        torch.set_num_threads(threads)
        for name, models, shared, densities, weights in CASES:
            method = METHODS[name]
            per_input = _complete(method, 0, per_input_params(models + 1, 0, weight=[None] + weights, density=[None] + densities))
            probe = _probe([None] * (models + 1), 0, shared_params(method, **shared), per_input, 5000, 0)
            probe.kernels = compiler
            method.warm_up(probe)
        ok = compiler.wait()
        torch.set_num_threads(before)
        assert ok, f"compiling the fused kernel failed: {compiler.failure}"
    compiler.close()
    return compiler


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_fused_kernel_gives_the_eager_bits(case, compiled, monkeypatch):
    name, models, shared, densities, weights = case
    for seed in range(3):
        tensors = _inputs(models, seed)
        eager = _merge(name, tensors, shared, densities, weights, True, monkeypatch)
        fast = _merge(name, tensors, shared, densities, weights, False, monkeypatch, kernels=compiled)
        assert torch.equal(eager.view(torch.int32), fast.view(torch.int32)), (name, seed)


def test_variants_outside_the_kernel_stay_eager():
    probe = lambda densities: ta.MergeInputs("t", [None] * 3, 0, {"normalize": False}, [{}, {"density": densities[0]}, {"density": densities[1]}])  # noqa: E731
    assert ta._variant(probe([0.5, 0.5]), ta.TOP_K, True) == fused.Variant(2, "magnitude", True, False)
    assert ta._variant(probe([0.5, 1.0]), ta.TOP_K, True) is not None  # kept whole: the threshold is just off
    assert ta._variant(probe([0.0, 0.5]), ta.TOP_K, True) is None  # density 0: eager zeroes the delta
    assert ta._variant(probe([0.5, 1.0]), ta.DARE, True) is None  # a DARE input kept whole has no mask
    assert ta._variant(probe([0.5, 0.5]), None, False) == fused.Variant(2, None, False, False)


def test_blocks_that_start_a_buffer_stay_eager():
    view = torch.zeros(40)[8:]
    assert fused.fits([view, view])
    assert not fused.fits([view, torch.zeros(32)])  # storage offset 0: the compiled code would recompile
    assert not fused.fits([view[:8]])  # too small
    assert not fused.fits([view.double()[0:]]) and not fused.fits([torch.zeros(40, 2)[8:, 0]])  # float64; strided


def test_eager_kernels_option_never_uses_the_compiled_formula(compiled, monkeypatch):
    name, models, shared, densities, weights = CASES[0]
    calls = []
    monkeypatch.setattr(ta, "_merge_fused", lambda inputs, v: calls.append(v))
    method = METHODS[name]
    tensors = _inputs(models, 0)
    per_input = per_input_params(models + 1, 0, weight=[None] + weights, density=[None] + densities)
    run_whole(method, tensors, 0, shared_params(method, **shared), per_input, kernels=None)  # --kernels eager: no compiler
    assert calls == []


def test_norms_kernel_gives_the_eager_rescale_factors(compiled, monkeypatch):
    """DARE's L1 norms from the compiled kernel: the same float64 sums up to their order of addition, and the same
    float32 rescale factors the merge multiplies by."""
    from method_harness import _complete

    method = METHODS["dare_ties"]
    per_input = _complete(method, 0, per_input_params(3, 0, weight=[None, 0.6, 0.7], density=[None, 0.5, 0.3]))
    for seed in range(3):
        tensors = _inputs(2, seed, n=70_000)
        inputs = ta.MergeInputs("t", tensors, 0, shared_params(method), per_input, 0, 70_000, seed, shape=(70_000,))
        sums = {}
        for kernels in (False, True):
            calls = []
            with monkeypatch.context() as m:
                inputs.kernels = compiled if kernels else None
                run = compiled.run
                m.setattr(compiled, "run", lambda v, *a, calls=calls, run=run: (calls.append(v), run(v, *a))[1])
                stats = method.statistics(inputs)
                stats.observe(0, inputs)
            assert calls == ([fused.Norms(2)] if kernels else [])
            sums[kernels] = stats
        for j in (0, 1):
            for eager, fast in ((sums[False].before[j], sums[True].before[j]), (sums[False].after[j], sums[True].after[j])):
                assert fast == pytest.approx(eager, rel=1e-13) and eager > 0
            assert fused.as_float32(sums[False].scale(j)) == fused.as_float32(sums[True].scale(j))
            assert 1.5 < sums[True].scale(j) < 4  # about 1/density


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_fused_merge_writes_the_eager_bytes(method, tmp_path, compiled, monkeypatch):
    """A whole merge with --kernels fused (tensors of several 2^18-element blocks, whole and in row chunks) writes the
    bytes of --kernels eager, and the compiled kernels really served blocks (DARE: its norms too)."""
    from mergeedit.merging.merge import MergeOptions, load_plan, write_merge
    from mergeedit.merging.schedule import schedule_plan
    from mergeedit.models.toy import LlamaShape, build_llama

    shape = LlamaShape(hidden=512, intermediate=2048, layers=1, heads=4, kv_heads=2, vocab=600)  # MLP: 4 blocks
    models = {k: build_llama(tmp_path / k, shape, variant=v, noise=0.5) for k, v in (("base", None), ("a", 1), ("b", 2))}
    cfg = tmp_path / f"{method}.yaml"
    cfg.write_text(f"""
merge_method: {method}
base_model: {models['base']}
models:
  - model: {models['a']}
    parameters: {{weight: 0.5, density: 0.3}}
  - model: {models['b']}
    parameters: {{weight: 0.5, density: 0.5}}
""")
    calls = []
    run = fused.KernelCompiler.run  # the executor's own compiler: every merge makes one
    monkeypatch.setattr(fused.KernelCompiler, "run", lambda self, v, *a: (calls.append(type(v)), run(self, v, *a))[1])

    reports = []

    def merge(name: str, kernels: str, budget: int = 1 << 30) -> dict[str, bytes]:
        opts = MergeOptions(memory_budget=budget, fsync=False, kernels=kernels)
        reports.append(write_merge(load_plan(cfg, opts), tmp_path / name, opts))
        return {p.name: p.read_bytes() for p in (tmp_path / name).glob("*.safetensors")}

    kinds = {fused.Variant} | ({fused.Norms} if method == "dare_ties" else set())
    eager = merge("eager", "eager")
    assert calls == []
    assert merge("fused", "fused") == eager
    assert set(calls) == kinds  # compiled for the executor's thread count by the fixture: used from the first big block
    assert reports[0].fused_blocks == 0 and reports[1].fused_blocks == len(calls)  # what the summary reports
    calls.clear()
    chunked = MergeOptions(memory_budget=40 << 20)
    assert any(len(s.chunks) > 1 for s in schedule_plan(load_plan(cfg, chunked), chunked.memory_budget))
    assert merge("fused-chunked", "fused", budget=40 << 20) == eager  # MLP matrices in two chunks of two blocks
    assert set(calls) == kinds


def test_a_kernel_that_differs_from_eager_is_never_used(monkeypatch):
    """The warm-up checks the compiled code against the eager formula on planted inputs: code giving other bits (here
    one value one ulp off) makes the compiler fail with the reason, and the merge stays eager."""
    v = fused.Variant(2, None, False, True)

    def off_by_one_ulp(base, xs, *args):
        out = fused.formula(base, xs, *args).clone()
        out[5] = torch.nextafter(out[5], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(fused, "_WARM", set())  # as in a fresh process: compiled, never run
    monkeypatch.setitem(fused._CODE, v, off_by_one_ulp)
    compiler = fused.KernelCompiler()
    compiler.request(v)
    assert not compiler.wait()
    assert not compiler.ready(v) and (v, torch.get_num_threads()) not in fused._WARM
    assert compiler.failure.startswith("KernelMismatch: the compiled Variant kernel gave other bits than the eager code on 1 of 1024")
    compiler.close()
    monkeypatch.setitem(fused._CODE, v, fused.formula)  # the eager formula itself passes the same check
    compiler = fused.KernelCompiler()
    compiler.request(v)
    assert compiler.wait() and compiler.ready(v) and compiler.failure is None
    compiler.close()


_ISA_RUN = """
import torch
from mergeedit.merging.methods import fused
v = fused.Variant(2, "magnitude", True, True)
fused._CODE[v] = fused._compile(fused.formula)
fused._warm(v)  # raises KernelMismatch if the compiled bits differ from eager's
from mergeedit.core.compiler import simd_bits
print(simd_bits())
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs a CPU with AVX-512 to run code of two vector widths")
def test_code_compiled_for_one_isa_is_not_reused_under_another(tmp_path):
    """torch's FX graph cache key leaves out the vector ISA (ATEN_CPU_CAPABILITY), so without the width named in the
    config (fused._compile) a kernel generated for AVX-512 and cached was loaded by an AVX2 process with its 16-lane
    loop over 8-lane vectors: half the output unwritten. Two processes sharing one inductor cache, AVX-512 first."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    for isa, bits in (("avx512", "512"), ("avx2", "256")):
        run = subprocess.run([sys.executable, "-c", _ISA_RUN], env={**env, "ATEN_CPU_CAPABILITY": isa}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split()[-1] == bits
