"""`mergeedit extract-lora`: a model's delta from its base as a PEFT LoRA adapter (truncated SVD per changed matrix)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeedit.merging.extract_lora import ExtractOptions, extract_lora, parse_rank_rules
from mergeedit.models.toy import LlamaShape, build_llama, load_state_dict

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=3, heads=4, kv_heads=2, vocab=128)
CLI = Path(sys.executable).parent / "mergeedit"
# Edited: layers 0 and 2, every MLP matrix and q_proj: a rank-3 change plus small full-rank noise, so the singular
# values fall off and energy thresholds pick different ranks for different modules.
CHANGED = {f"model.layers.{i}.{m}" for i in (0, 2) for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj")}


def _write_like(base: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of `base`'s config with `tensors` as its single weight file."""
    out.mkdir(parents=True)
    shutil.copy(base / "config.json", out / "config.json")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _edit(sd: dict[str, torch.Tensor], names, seed: int, low_rank: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k, name in enumerate(sorted(names)):
        w = sd[name]
        if w.dim() == 2:
            m, n = w.shape
            r = low_rank + k % 3  # ranks 3..5: different energy ranks per module
            scales = torch.tensor([0.5**i for i in range(r)])
            change = (torch.randn(m, r, generator=g) * scales) @ torch.randn(r, n, generator=g) * 0.01 + 0.0005 * torch.randn(m, n, generator=g)
        else:
            change = 0.01 * torch.randn(w.shape, generator=g)
        out[name] = w + change
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extract")
    base = build_llama(root / "base", SHAPE, shards=2)
    sd = load_state_dict(base)
    edited = _write_like(base, root / "edited", _edit(sd, [n + ".weight" for n in CHANGED], seed=1))
    return {"root": root, "base": base, "edited": edited, "sd": sd}


def _factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    t = load_file(adapter / "adapter_model.safetensors")
    mods = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in t if k.endswith(".lora_A.weight")}
    return {m: (t[f"base_model.model.{m}.lora_A.weight"].double(), t[f"base_model.model.{m}.lora_B.weight"].double()) for m in mods}


def _deltas(pair) -> dict[str, torch.Tensor]:
    edited = load_state_dict(pair["edited"])
    return {m: edited[m + ".weight"].double() - pair["sd"][m + ".weight"].double() for m in CHANGED}


def _extract(pair, out: Path, **kw) -> Path:
    extract_lora(str(pair["edited"]), str(pair["base"]), out, ExtractOptions(**kw))
    return out


def test_full_rank_reconstructs_the_delta_to_float_rounding(pair, tmp_path):
    out = _extract(pair, tmp_path / "ad", rank=32)  # every changed matrix is at most rank 32 (hidden size)
    factors, deltas = _factors(out), _deltas(pair)
    assert set(factors) == CHANGED  # unchanged tensors (norms, embeddings, layer 1) are not in the adapter
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(CHANGED) and config["r"] == config["lora_alpha"] == 32 and not config["rank_pattern"]
    for m, (a, b) in factors.items():
        d = deltas[m]
        assert a.shape == (32, d.shape[1]) and b.shape == (d.shape[0], 32)
        err = torch.linalg.norm(b @ a - d) / torch.linalg.norm(d)
        assert err < 2e-7, (m, float(err))  # float32 factors: float rounding only
    report = json.loads((out / "extract_lora.json").read_text())
    assert report["unchanged_tensors"] == len(pair["sd"]) - len(CHANGED)
    assert max(v["relative_error"] for v in report["modules"].values()) < 1e-12  # exact factors: nothing dropped


def test_low_rank_error_is_the_svd_optimum(pair, tmp_path):
    out = _extract(pair, tmp_path / "ad", rank=4)
    report = json.loads((out / "extract_lora.json").read_text())["modules"]
    for m, (a, b) in _factors(out).items():
        d = _deltas(pair)[m]
        s = np.linalg.svd(d.numpy(), compute_uv=False)  # numpy's LAPACK, not torch's: an independent reference
        optimum = math.sqrt(float((s[4:] ** 2).sum()))
        assert optimum > 1e-4 * float(np.linalg.norm(d.numpy()))  # the truncation really drops something
        got = float(torch.linalg.norm(b @ a - d))
        assert got == pytest.approx(optimum, rel=1e-5), m
        assert report[m]["error"] == pytest.approx(optimum, rel=1e-9) and report[m]["rank"] == 4


def _energy_rank(d: torch.Tensor, share: float) -> int:
    e = np.linalg.svd(d.numpy(), compute_uv=False) ** 2
    return int(np.argmax(np.cumsum(e) >= share * e.sum())) + 1


def test_energy_threshold_and_rank_rules_pick_per_module_ranks(pair, tmp_path):
    out = _extract(pair, tmp_path / "ad", rank=8, sv_energy=0.99, rank_for=parse_rank_rules(["layers\\.2\\.mlp\\.down_proj=2"]))
    factors, deltas = _factors(out), _deltas(pair)
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    for m, d in deltas.items():
        cap = 2 if m == "model.layers.2.mlp.down_proj" else 8
        assert ranks[m] == min(_energy_rank(d, 0.99), cap), m
    assert len(set(ranks.values())) > 1  # the case this test is for: ranks differ, so the patterns are needed
    for m, r in ranks.items():  # what peft will build: rank_pattern's match (peft's own rule), else r; alpha equal
        from mergeedit.io.lora import pattern_value

        assert pattern_value(config["rank_pattern"], m, config["r"]) == r
        assert pattern_value(config["alpha_pattern"], m, config["lora_alpha"]) == r


def test_energy_one_keeps_everything_and_a_tiny_share_keeps_rank_one(pair, tmp_path):
    full = _factors(_extract(pair, tmp_path / "full", sv_energy=1.0))
    one = _factors(_extract(pair, tmp_path / "one", sv_energy=1e-9))
    assert all(a.shape[0] == 32 for a, _ in full.values()) and all(a.shape[0] == 1 for a, _ in one.values())


def test_bytes_do_not_depend_on_the_budget_or_the_thread_count(pair, tmp_path):
    digests = set()
    threads = torch.get_num_threads()
    try:
        for k, (budget, n_threads) in enumerate([(None, 1), (300_000, 4), (10**9, 4), (10**9, 2)]):  # SVDs at a time: 1, 2-3 (the budget), 4, 2
            torch.set_num_threads(n_threads)
            out = _extract(pair, tmp_path / f"ad{k}", rank=5, memory_budget=budget)
            digests.add(tuple(hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("adapter_model.safetensors", "adapter_config.json")))
    finally:
        torch.set_num_threads(threads)
    assert len(digests) == 1


def test_path_lora_folds_the_adapter_back(pair, tmp_path, run_cli):
    """mergeedit's own `base+adapter` reads the extracted adapter (with rank and alpha patterns) back into the model."""
    ad = _extract(pair, tmp_path / "ad", rank=32, rank_for=[("down_proj", 31)])  # mixed ranks: alpha_pattern must be honoured
    assert json.loads((ad / "adapter_config.json").read_text())["alpha_pattern"]
    config = tmp_path / "fold.yaml"
    config.write_text(f"merge_method: passthrough\nmodels:\n  - model: {pair['base']}+{ad}\ndtype: float32\n")
    result = run_cli("merge", config, tmp_path / "folded")
    assert result.code == 0, result.stderr
    folded, edited, factors = load_state_dict(tmp_path / "folded"), load_state_dict(pair["edited"]), _factors(ad)
    for name, w in pair["sd"].items():
        m = name.removesuffix(".weight")
        if m in factors:
            a, b = factors[m]
            torch.testing.assert_close(folded[name].double(), w.double() + b @ a, atol=1e-7, rtol=0)  # scale exactly 1
            if not m.endswith("down_proj"):
                torch.testing.assert_close(folded[name], edited[name], atol=1e-7, rtol=0)  # full rank: the edited weights
        else:
            assert torch.equal(folded[name], w), name


def test_peft_loads_it_and_gives_the_logits_of_base_plus_folded_delta(pair, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install -c constraints.txt 'mergeedit[adapter]')")
    from transformers import LlamaForCausalLM

    ad = _extract(pair, tmp_path / "ad", rank=8, sv_energy=0.99)  # per-module ranks: rank_pattern and alpha_pattern
    factors = _factors(ad)
    assert len({a.shape[0] for a, _ in factors.values()}) > 1
    base = LlamaForCausalLM.from_pretrained(pair["base"], dtype=torch.float32).eval()
    reference = LlamaForCausalLM.from_pretrained(pair["base"], dtype=torch.float32).eval()
    with torch.no_grad():
        params = dict(reference.named_parameters())
        for m, (a, b) in factors.items():
            params[m + ".weight"].copy_((params[m + ".weight"].double() + b @ a).float())
    model = peft.PeftModel.from_pretrained(base, str(ad)).eval()
    for name, module in model.named_modules():  # peft built exactly our ranks, with scale 1
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            target = name.removeprefix("base_model.model.")
            assert module.lora_A["default"].weight.shape[0] == factors[target][0].shape[0] and module.scaling["default"] == 1.0
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 3]])
    with torch.no_grad():
        got, want, plain = model(ids).logits, reference(ids).logits, LlamaForCausalLM.from_pretrained(pair["base"]).eval()(ids).logits
    assert (want - plain).abs().max() > 1e-4  # the adapter changes the logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_model_plus_adapter_can_be_re_extracted_at_a_lower_rank(pair, tmp_path):
    full = _extract(pair, tmp_path / "full", rank=32)
    low = tmp_path / "low"
    extract_lora(f"{pair['base']}+{full}", str(pair["base"]), low, ExtractOptions(rank=4))
    direct = _extract(pair, tmp_path / "direct", rank=4)
    for m, (a, b) in _factors(low).items():
        a2, b2 = _factors(direct)[m]
        torch.testing.assert_close(b @ a, b2 @ a2, atol=1e-6, rtol=0)


# -- bad input: one line, exit status 2, nothing written, through the real console script --------------------------
@pytest.fixture(scope="module")
def bad_models(pair) -> dict[str, Path]:
    root, sd, base = pair["root"], pair["sd"], pair["base"]
    other_shape = build_llama(root / "other_shape", LlamaShape(**{**SHAPE.__dict__, "intermediate": 48}), shards=1)
    tied = build_llama(root / "tied", LlamaShape(**{**SHAPE.__dict__, "tied": True}), shards=1)  # no lm_head.weight
    return {
        "unrelated": build_llama(root / "unrelated", SHAPE, base_seed=9, shards=1),  # same architecture, another model
        "other_shape": other_shape,
        "tied": tied,
        "embedding": _write_like(base, root / "embedding", _edit(sd, ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"], seed=2)),
        "norm": _write_like(base, root / "norm", _edit(sd, ["model.layers.1.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight"], seed=3)),
    }


@pytest.mark.parametrize(
    "case, args, needle",
    [
        ("rank too large", ["{edited}", "--base", "{base}", "--rank", "40"], "so its rank is at most 32, but --rank asks for 40"),
        ("shapes differ", ["{edited}", "--base", "{other_shape}", "--rank", "4"], "is [32, 64] but the base"),
        ("names differ", ["{edited}", "--base", "{tied}", "--rank", "4"], "tensor 'lm_head.weight' is not in the base"),
        ("unrelated base", ["{edited}", "--base", "{unrelated}", "--rank", "4"], "BASE does not look like the model MODEL was made from"),
        ("embedding delta", ["{embedding}", "--base", "{base}", "--rank", "4"], "'model.embed_tokens.weight' [128, 32] (a token embedding or output head) changed"),
        ("norm delta", ["{norm}", "--base", "{base}", "--rank", "4"], "'model.layers.1.input_layernorm.weight' [32] changed, but a LoRA adapter holds only 2-D weight matrices"),
        ("model is base", ["{base}", "--base", "{base}", "--rank", "4"], "no changed weight matrix to export (every tensor is identical"),
        ("budget too small", ["{edited}", "--base", "{base}", "--rank", "4", "--memory-budget", "20K"], "raise --memory-budget to at least"),
    ],
)
def test_bad_input_is_one_line_and_nothing_is_written(pair, bad_models, tmp_path, case, args, needle):
    paths = {**{k: str(v) for k, v in bad_models.items()}, "edited": str(pair["edited"]), "base": str(pair["base"])}
    out = tmp_path / "parent" / "adapter"
    result = subprocess.run([str(CLI), "extract-lora", *(a.format(**paths) for a in args[:1]), str(out), *(a.format(**paths) for a in args[1:])],
                            capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (case, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (case, result.stderr)
    assert not (tmp_path / "parent").exists()  # no output, no temporary sibling, no lock, no parent folder


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--rank", "4", "--rank-for", "up_proj=33"], "--rank-for asks for 33"),
        ([], "give --rank R"),
        (["--rank", "4", "--rank-for", "up_proj"], "expected REGEX=RANK"),
        (["--rank", "4", "--rank-for", "up_proj(=2"], "not a valid regular expression"),
        (["--sv-energy", "1.5"], "in (0, 1]"),
        (["--rank", "0"], "at least 1"),
        (["--rank", "4", "--dtype", "int8"], "unknown dtype"),
    ],
)
def test_bad_options_are_one_line(pair, tmp_path, run_cli, args, needle):
    """The same contract for option mistakes, in process (the console script's path is covered above)."""
    out = tmp_path / "parent" / "adapter"
    result = run_cli("extract-lora", pair["edited"], out, "--base", pair["base"], *args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.code == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    assert not (tmp_path / "parent").exists()


def test_skip_leaves_named_tensors_out(pair, bad_models, tmp_path):
    out = tmp_path / "ad"
    report = extract_lora(str(bad_models["norm"]), str(pair["base"]), out, ExtractOptions(rank=4, skip=["layernorm"]))
    assert report.skipped_changed == ["model.layers.1.input_layernorm.weight"]
    assert set(_factors(out)) == {"model.layers.0.mlp.up_proj"}


# -- in a recipe: output: {adapter: {rank: R}} ----------------------------------------------------------------------
from test_pipeline import tiny_model  # noqa: E402,F401  (the module-scoped tiny trainable model fixture)


def test_recipe_exports_the_edits_as_an_adapter_beside_the_model(tmp_path, tiny_model):  # noqa: F811
    from test_pipeline import _recipe

    from mergeedit.io.integrity import verify_folder
    from mergeedit.pipeline.runner import RecipeRun

    recipe = _recipe(tmp_path, tiny_model, output={"dir": "run", "adapter": {"rank": 32}}, eval={"enabled": False},
                     rsft={"max_epochs": 1, "max_steps_per_batch": 2})  # a few steps: the adapter needs a change, not learned edits
    result = RecipeRun(recipe).run()
    adapter = tmp_path / "run" / "adapter"
    assert "adapter" in result.stages_run and verify_folder(adapter) >= 4
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    edited, base, factors = load_state_dict(result.model_dir), load_state_dict(tiny_model), _factors(adapter)
    changed = {n.removesuffix(".weight") for n in base if not torch.equal(edited[n], base[n])}
    assert factors and set(factors) == changed  # exactly the tensors the edit changed (the trained MLP matrices)
    for m, (a, b) in factors.items():  # full rank: base + B A is the edited model
        torch.testing.assert_close(b @ a, edited[m + ".weight"].double() - base[m + ".weight"].double(), atol=1e-6, rtol=0)
    again = RecipeRun(recipe).run()
    assert "adapter" in again.stages_cached and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_recipe_adapter_section_needs_a_rank(tmp_path, tiny_model, run_cli):  # noqa: F811
    from test_pipeline import _recipe

    recipe = _recipe(tmp_path, tiny_model, output={"dir": "run", "adapter": {"dtype": "float32"}})
    result = run_cli("validate", recipe)
    assert result.code == 2 and "output.adapter" in result.stderr and "give rank" in result.stderr, result.stderr


def test_conv1d_models_are_decomposed_transposed_with_fan_in_fan_out(tmp_path, run_cli):
    """GPT-2 stores its projections (in, out) (transformers' Conv1D): the adapter holds the layer's (out, in) factors and
    says fan_in_fan_out, which peft and mergeedit's path+lora both read."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)).save_pretrained(tmp_path / "base")
    sd = load_file(tmp_path / "base" / "model.safetensors")
    changed = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight"]
    edited = _write_like(tmp_path / "base", tmp_path / "edited", _edit(sd, changed, seed=5))
    ad = tmp_path / "ad"
    extract_lora(str(edited), str(tmp_path / "base"), ad, ExtractOptions(rank=32))
    assert json.loads((ad / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    e = load_file(edited / "model.safetensors")
    for name in changed:
        a, b = _factors(ad)[name.removesuffix(".weight")]
        stored = sd[name]  # (in, out)
        assert a.shape == (32, stored.shape[0]) and b.shape == (stored.shape[1], 32)
        torch.testing.assert_close((b @ a).t(), e[name].double() - stored.double(), atol=1e-7, rtol=0)
    config = tmp_path / "fold.yaml"
    config.write_text(f"merge_method: passthrough\nmodels:\n  - model: {tmp_path / 'base'}+{ad}\ndtype: float32\n")
    assert run_cli("merge", config, tmp_path / "folded").code == 0
    folded = load_state_dict(tmp_path / "folded")
    for name in changed:
        torch.testing.assert_close(folded[name], e[name], atol=1e-6, rtol=0)
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install -c constraints.txt 'mergeedit[adapter]')")
    ids = torch.tensor([[1, 5, 9, 17, 33, 63]])
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), str(ad)).eval()(ids).logits
        want = GPT2LMHeadModel.from_pretrained(edited).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pattern_matching_is_peft_s_own():
    """path+lora picks a module's rank/alpha pattern entry exactly as peft does (mergekit writes unescaped names)."""
    other = pytest.importorskip("peft.utils.other", reason="peft is not installed (pip install -c constraints.txt 'mergeedit[adapter]')")
    from mergeedit.io.lora import pattern_value
    from mergeedit.merging.extract_lora import pattern_key

    pattern = {"model.layers.1.mlp.down_proj": 3, pattern_key("model.layers.11.mlp.up_proj"): 5, "up_proj": 7, "^model\\.layers\\.2\\..*": 9}
    for module in ["model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj", "model.layers.11.mlp.up_proj", "model.layers.1.mlp.up_proj",
                   "model.layers.2.self_attn.q_proj", "model.layers.21.mlp.gate_proj", "lm_head"]:
        key = other.get_pattern_key(list(pattern), module)
        assert pattern_value(pattern, module, -1) == pattern.get(key, -1), module
