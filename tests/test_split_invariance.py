"""The bytes of a merge do not depend on the memory budget, the block size, the number of row chunks or the thread
count: every merge method (and LoRA folds, tests/test_tokenizer_lora.py) is run whole and cut in other places, and
the output files must be identical. Whole-tensor statistics add in element order (methods/ordered.py), so the run
that cuts a tensor at other rows adds the same numbers in the same order."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_config

from mergeedit.merging import executor, schedule
from mergeedit.merging.merge import MergeOptions, load_plan, write_merge
from mergeedit.merging.methods import METHODS
from mergeedit.merging.methods.ordered import ordered_row_sums, ordered_sum


def _models(names, params=None):
    params = params or {}
    return "".join(f"  - model: @{n}\n" + (f"    parameters: {params[n]}\n" if n in params else "") for n in names)


W = {"a": "{weight: 0.6, density: 0.4}", "b": "{weight: 0.3, density: 0.7}", "c": "{weight: 0.5, density: 0.55}"}
CONFIGS = {
    "linear": ("models:\n" + _models("abc", {k: "{weight: %s}" % w for k, w in zip("abc", (0.6, 0.3, 0.5))}), ""),
    "task_arithmetic": ("base_model: @base\nmodels:\n" + _models("abc", W), "parameters: {lambda: 0.9}\n"),
    "ties": ("base_model: @base\nmodels:\n" + _models("abc", W), "parameters: {rescale: true}\n"),
    "dare_ties": ("base_model: @base\nmodels:\n" + _models("abc", W), ""),
    "dare_linear": ("base_model: @base\nmodels:\n" + _models("abc", W), ""),
    "breadcrumbs": ("base_model: @base\nmodels:\n" + _models("abc", W), "parameters: {gamma: 0.05}\n"),
    "breadcrumbs_ties": ("base_model: @base\nmodels:\n" + _models("abc", W), "parameters: {gamma: 0.05, rescale: true}\n"),
    "della": ("base_model: @base\nmodels:\n" + _models("abc", W), ""),
    "della_linear": ("base_model: @base\nmodels:\n" + _models("abc", W), ""),
    "sce": ("base_model: @base\nmodels:\n" + _models("abc"), "parameters: {select_topk: 0.5}\n"),
    "slerp": ("base_model: @base\nmodels:\n" + _models(["base", "a"]), "parameters: {t: 0.3}\n"),
    "nuslerp": ("base_model: @base\nmodels:\n" + _models("ab", {"a": "{weight: 0.3}", "b": "{weight: 0.9}"}), "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n"),
    "multislerp": ("base_model: @base\nmodels:\n" + _models("abc", {k: "{weight: %s}" % w for k, w in zip("abc", (0.6, 0.3, 0.5))}), ""),
    "karcher": ("models:\n" + _models("abc"), "parameters: {max_iter: 3}\n"),
    "model_stock": ("base_model: @base\nmodels:\n" + _models("abc"), "parameters: {filter_wise: true}\n"),
    "passthrough": ("models:\n" + _models("a", {"a": "{scale: 0.7}"}), ""),
    "ram": ("base_model: @base\nmodels:\n" + _models("abc"), "parameters: {epsilon: 0.2}\n"),
    "ramplus_tl": ("base_model: @base\nmodels:\n" + _models("abc"), "parameters: {epsilon: 0.2, r: 0.5, alpha: 1.0}\n"),
    "nearswap": ("base_model: @base\nmodels:\n" + _models("a"), "parameters: {t: 0.3}\n"),
    "arcee_fusion": ("base_model: @base\nmodels:\n" + _models("a"), ""),
}
# (memory budget, elements per block, torch threads): the first is the reference (whole tensors, default blocks). The
# three small budgets cut 17-23 of the 30 tensors into row chunks (62-567 chunks a merge), at other rows in each run
# (asserted); a smaller budget only adds chunks, at ~4 ms each (2,500 bytes made 1,031 chunks a merge)
RUNS = [(1 << 30, None, 1), (1 << 30, 997, 2), (20_000, None, 2), (12_000, 331, 1), (7_000, None, 1)]


def test_every_method_has_a_case():
    assert set(CONFIGS) == set(METHODS)


def _merge(cfg, out, budget, block, threads, monkeypatch):
    monkeypatch.setattr(executor, "DEFAULT_BLOCK", block or (1 << 18))
    monkeypatch.setattr(executor, "math_threads", lambda with_statistics=False: threads)
    opts = MergeOptions(memory_budget=budget, fsync=False, random_seed=5)
    plan = load_plan(cfg, opts)
    cuts = tuple(tuple(s.chunks) for s in schedule.schedule_plan(plan, budget) if len(s.chunks) > 1)
    write_merge(plan, out, opts)
    return cuts, {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_bytes_do_not_depend_on_budget_blocks_or_threads(method, dtype, models, tmp_path, monkeypatch):
    head, tail = CONFIGS[method]
    text = f"merge_method: {method}\n{head}{tail}dtype: {dtype}\n"
    for key in ("base", "a", "b", "c"):
        text = text.replace(f"@{key}\n", f"{models[key]}\n")
    cfg = write_config(tmp_path, text)
    outputs, chunked = [], []
    for i, (budget, block, threads) in enumerate(RUNS):
        cuts, files = _merge(cfg, tmp_path / f"out{i}", budget, block, threads, monkeypatch)
        outputs.append(files)
        chunked.append(cuts)
    assert not chunked[0] and all(chunked[2:]) and len(set(chunked[2:])) == 3  # the small budgets cut, at different rows
    for i, files in enumerate(outputs[1:], 1):
        assert files == outputs[0], (method, dtype, RUNS[i])


@pytest.mark.parametrize("threads", [1, 2])
def test_ordered_sums_are_the_sequential_sums(threads):
    """torch.cumsum over a 1-D float64 tensor is the plain left-to-right scan: the same bits as a Python loop, with 1
    or 2 threads, and a running total carried over any cut gives the whole's bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(70_001, generator=g, dtype=torch.float64) * torch.rand(70_001, generator=g, dtype=torch.float64).pow(6) * 1e4
        loop = 0.25
        for v in x.tolist():
            loop += v
        assert ordered_sum(x, 0.25) == loop
        # planted: 1.0, then 70,000 values of 2^-53, each lost when added to a running total >= 1 (half an ulp, ties to
        # even), so the sequential sum is exactly 1.25; any other order adds two of them together somewhere and keeps
        # them. The precondition, by construction: torch's own sum is another order and gives another number.
        planted = torch.full((70_001,), 2.0**-53, dtype=torch.float64)
        planted[0] = 1.0
        assert ordered_sum(planted, 0.25) == 1.25 and ordered_sum(planted[1:], 1.25) == 1.25
        assert float(planted.sum()) + 0.25 != 1.25
        for cuts in ([5, 33_000], [1, 2, 3, 65_536], list(range(0, 70_001, 4099))):
            total = 0.25
            for a, b in zip([0, *cuts], [*cuts, x.numel()]):
                total = ordered_sum(x[a:b], total)
            assert total == loop, cuts
        rows = x[:70_000].view(7, 10_000)
        assert torch.equal(ordered_row_sums(rows)[3:4], ordered_row_sums(rows[3:4]))
    finally:
        torch.set_num_threads(before)


# Tensors big enough for torch to split work between threads (its grain is 32,768 elements): a reduction over one row
# longer than that (a row chunk of one row) is cut between 2 threads, and rows are shared out between them.
WIDE = {"wide.weight": (3, 34_000), "tall.weight": (2_200, 32), "flat.bias": (70_001,)}
# (memory budget, elements per block, torch threads): whole and 1 thread first, then 2 threads whole and in row chunks
# of other sizes, and 1 thread in small blocks
BIG_RUNS = [(1 << 30, None, 1), (1 << 30, None, 2), (3_000_000, 20_011, 2), (1_500_000, None, 2), (1 << 30, 16_411, 1)]


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("wide")
    g = torch.Generator().manual_seed(14)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in WIDE.items()}
    paths = {"base": root / "base.safetensors"}
    save_file(base, paths["base"])
    for i, key in enumerate("abc"):
        x = {k: v + torch.randn(v.shape, generator=g) * 0.002 * (i + 1) for k, v in base.items()}
        paths[key] = root / f"{key}.safetensors"
        save_file(x, paths[key])
    adapter = root / "adapter"  # a LoRA adapter on the two matrices, folded into the base as it is read
    adapter.mkdir()
    factors = {}
    for name in ("wide", "tall"):
        out_f, in_f = WIDE[f"{name}.weight"]
        factors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g)
        factors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 1e-2
    save_file(factors, adapter / "adapter_model.safetensors")
    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["wide", "tall"], "fan_in_fan_out": False}
    (adapter / "adapter_config.json").write_text(json.dumps(lora))
    paths["base+adapter"] = f"{paths['base']}+{adapter}"
    return paths


def _wide_config(method: str, dtype: str, models) -> str:
    """The CONFIGS case of `method` on the wide models; "lora_fold": the base with the adapter folded in."""
    if method == "lora_fold":
        return f"merge_method: passthrough\nmodels:\n  - model: {models['base+adapter']}\ndtype: {dtype}\n"
    head, tail = CONFIGS[method]
    text = f"merge_method: {method}\n{head}{tail}dtype: {dtype}\n"
    for key in ("base", "a", "b", "c"):
        text = text.replace(f"@{key}\n", f"{models[key]}\n")
    return text


@pytest.mark.parametrize("method", [*sorted(CONFIGS), "lora_fold"])
def test_bytes_do_not_depend_on_threads_or_row_chunks_of_tensors_torch_splits(method, wide_models, tmp_path, monkeypatch):
    """The same, on tensors torch parallelises: rows of 34,000 (a lone row's reduction is split between threads),
    2,200 rows of 32 (rows shared out between threads) and a 1-D tensor of 70,001, with 1 and 2 threads and budgets
    that cut the tensors at other rows; and a LoRA fold into the two matrices."""
    cfg = write_config(tmp_path, _wide_config(method, "float32", wide_models))
    outputs, chunked = [], []
    for i, (budget, block, threads) in enumerate(BIG_RUNS):
        cuts, files = _merge(cfg, tmp_path / f"out{i}", budget, block, threads, monkeypatch)
        outputs.append(files)
        chunked.append(cuts)
    assert not chunked[0] and not chunked[1] and chunked[2] and chunked[3] and chunked[2] != chunked[3], chunked
    assert outputs[0], "no output"
    for i, files in enumerate(outputs[1:], 1):
        assert files == outputs[0], (method, BIG_RUNS[i])


_MERGE_ALL = """
import sys
from pathlib import Path
from mergeedit.merging.merge import MergeOptions, load_plan, write_merge
folder = Path(sys.argv[1])
for cfg in sorted(folder.glob("*.yaml")):
    opts = MergeOptions(fsync=False, random_seed=5)
    write_merge(load_plan(cfg, opts), folder / sys.argv[2] / cfg.stem, opts)
"""
# two vector ISAs (ATen and inductor honour ATEN_CPU_CAPABILITY): 16 and 8 float lanes, both with fused multiply-add.
# ATen's portable code ("default", for CPUs without AVX2) is not compared: it has no FMA, so ops that ATen fuses on
# every SIMD ISA (add with alpha, lerp) round twice there, and linear and the slerp family give other low bits.
ISAS = ("avx512", "avx2")
NEEDS_AVX512 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs a CPU with AVX-512 to run two vector widths")


@pytest.fixture(scope="module")
def isa_outputs(wide_models, tmp_path_factory):
    """Every method's merge of the wide models in float32 and bfloat16, computed by one process per vector ISA."""
    import os
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("isa")
    for method in [*CONFIGS, "lora_fold"]:
        for dtype in ("float32", "bfloat16"):
            (folder / f"{method}-{dtype}.yaml").write_text(_wide_config(method, dtype, wide_models))
    for isa in ISAS:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": isa, "MKL_ENABLE_INSTRUCTIONS": "AVX2" if isa == "avx2" else "AVX512"}
        run = subprocess.run([sys.executable, "-c", _MERGE_ALL, str(folder), isa], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    return folder


@NEEDS_AVX512
@pytest.mark.parametrize("method", [*sorted(CONFIGS), "lora_fold"])
def test_bytes_do_not_depend_on_the_vector_isa(method, isa_outputs):
    """The same merge computed with two vector widths (another processor's ATen kernels) writes the same bytes."""
    for dtype in ("float32", "bfloat16"):
        files = [sorted((isa_outputs / isa / f"{method}-{dtype}").glob("*.safetensors")) for isa in ISAS]
        assert files[0] and [f.name for f in files[0]] == [f.name for f in files[1]]
        for a, b in zip(*files):
            assert a.read_bytes() == b.read_bytes(), (method, dtype, ISAS)
