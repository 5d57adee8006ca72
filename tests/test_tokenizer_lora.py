"""Tokenizer merges (tokenizer_source / tokenizer:), chat templates and `model+adapter` LoRA folding."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import write_config
from safetensors.torch import save_file

from mergeedit.merging.chat_templates import BUILTIN_TEMPLATES
from mergeedit.models.toy import LlamaShape, build_llama, load_state_dict

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SMALL = dict(hidden=8, intermediate=16, layers=1, heads=2, kv_heads=1)


def save_tokenizer(folder: Path, tokens: list[str], chat_template: str | None = None) -> None:
    """A WordLevel tokenizer whose token i has id i (token 0 is the unknown token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=tokens[0])
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(folder))


def vocab_model(root: Path, name: str, tokens: list[str], variant: int | None, **kw) -> Path:
    folder = build_llama(root / name, LlamaShape(**SMALL, vocab=len(tokens)), variant=variant, noise=0.5, shards=1)
    save_tokenizer(folder, tokens, **kw)
    return folder


# base lacks c, d; m1 lacks x, d; m2 lacks b, x. Union order: base's tokens, then m1's new (c), then m2's new (d).
VOCABS = {"base": ["u", "a", "b", "x"], "m1": ["u", "b", "a", "c"], "m2": ["u", "a", "c", "d"]}
UNION = ["u", "a", "b", "x", "c", "d"]


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {name: vocab_model(root, name, toks, None if name == "base" else k) for k, (name, toks) in enumerate(VOCABS.items())}


def union_config(folder: Path, models: dict[str, Path], extra: str = "", weights=(1.0, 10.0, 100.0)) -> Path:
    entries = "".join(f"  - model: {models[n]}\n    parameters: {{weight: {w}}}\n" for n, w in zip(VOCABS, weights))
    return write_config(folder, f"merge_method: linear\nbase_model: {models['base']}\nmodels:\n{entries}{extra}")


def rows_of(models: dict[str, Path], tensor: str, tensors: dict[str, str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """model -> token -> its row of `tensor` (or of tensors[model]), straight from the input files."""
    tensors = tensors or {}
    return {n: {tok: load_state_dict(models[n])[tensors.get(n, tensor)][i] for i, tok in enumerate(VOCABS[n])} for n in VOCABS}


def auto_rows(rows) -> dict[str, dict[str, torch.Tensor]]:
    """Each model's row per union token under mergekit's fill rules, spelled out token by token."""
    out = {n: dict(r) for n, r in rows.items()}
    out["m2"]["b"] = rows["base"]["b"]  # in base and m1: the base's row
    out["m1"]["x"] = out["m2"]["x"] = rows["base"]["x"]  # only the base has it
    out["base"]["c"] = (torch.zeros(8) + rows["m1"]["c"] + rows["m2"]["c"]) / 2  # in m1 and m2, not the base: their mean
    out["base"]["d"] = out["m1"]["d"] = rows["m2"]["d"]  # only m2 has it
    return out


def linear(per_model, token: str, weights=(1.0, 10.0, 100.0)) -> torch.Tensor:
    return sum(w * per_model[n][token] for n, w in zip(VOCABS, weights)) / sum(weights)


@pytest.mark.parametrize("budget", [None, "2K"])
def test_union_vocabulary_rows_follow_mergekit_fill_rules(vocab_models, tmp_path, run_cli, budget):
    from transformers import AutoTokenizer

    cfg = union_config(tmp_path, vocab_models, "tokenizer_source: union\n")
    out = tmp_path / "out"
    args = ["--memory-budget", budget] if budget else []
    result = run_cli("merge", cfg, out, *args)
    assert result.code == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(out)
    assert [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])] == UNION
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(UNION)
    merged = load_state_dict(out)
    for tensor in (EMBED, HEAD):
        expected = auto_rows(rows_of(vocab_models, tensor))
        assert merged[tensor].shape == (len(UNION), 8)
        for i, token in enumerate(UNION):
            torch.testing.assert_close(merged[tensor][i], linear(expected, token), rtol=0, atol=1e-6)
    # every other tensor is the plain linear merge
    states = [load_state_dict(vocab_models[n]) for n in VOCABS]
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], (states[0][name] + 10 * states[1][name] + 100 * states[2][name]) / 111, rtol=0, atol=1e-6)


def test_tokens_block_sources_force_and_padding(vocab_models, tmp_path, run_cli):
    block = (
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 4\n  tokens:\n"
        "    z: {source: {kind: zero}}\n"
        f"    a: {{source: {vocab_models['m1']}, force: true}}\n"
        f"    c: {{source: {{kind: model_token, model: {vocab_models['m2']}, token: d}}}}\n"
    )
    cfg = union_config(tmp_path, vocab_models, block)
    out = tmp_path / "out"
    result = run_cli("merge", cfg, out)
    assert result.code == 0, result.stderr
    vocab = UNION + ["z"]
    merged = load_state_dict(out)[EMBED]
    assert merged.shape == (8, 8)  # 7 tokens padded to a multiple of 4
    rows = rows_of(vocab_models, EMBED)
    expected = auto_rows(rows)
    expected["base"]["c"] = rows["m2"]["d"]  # configured source replaces the mean for the model lacking c
    for n in VOCABS:
        expected[n]["a"] = rows["m1"]["a"]  # forced for every model
        expected[n]["z"] = torch.zeros(8)
    for i, token in enumerate(vocab):
        torch.testing.assert_close(merged[i], linear(expected, token), rtol=0, atol=1e-6)
    pad = {n: torch.stack([expected[n][t] for t in vocab]).mean(0) for n in VOCABS}
    torch.testing.assert_close(merged[7], linear({n: {"p": pad[n]} for n in VOCABS}, "p"), rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 8


def test_tokenizer_source_base_and_model(vocab_models, tmp_path, run_cli):
    rows = rows_of(vocab_models, EMBED)
    for source, vocab in (("base", VOCABS["base"]), (str(vocab_models["m2"]), VOCABS["m2"])):
        out = tmp_path / f"out-{len(source)}"
        assert run_cli("merge", union_config(tmp_path, vocab_models, f"tokenizer_source: {source}\n"), out).code == 0
        merged = load_state_dict(out)[EMBED]
        expected = auto_rows(rows)
        for i, token in enumerate(vocab):
            torch.testing.assert_close(merged[i], linear(expected, token), rtol=0, atol=1e-6)


def test_different_vocab_sizes_without_tokenizer_source_is_a_clear_error(vocab_models, tmp_path, run_cli):
    bigger = vocab_model(tmp_path, "big", VOCABS["m1"] + ["e"], 5)
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {vocab_models['base']}\n    parameters: {{weight: 1}}\n  - model: {bigger}\n    parameters: {{weight: 1}}\n")
    result = run_cli("merge", cfg, tmp_path / "out")
    assert result.code == 2
    assert EMBED in result.stderr and "big" in result.stderr and "tokenizer_source" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_source_outside_the_inputs_is_a_clear_error(vocab_models, tmp_path, run_cli):
    cfg = union_config(tmp_path, vocab_models, "tokenizer:\n  tokens:\n    q: {source: some/other}\n")
    result = run_cli("merge", cfg, tmp_path / "out")
    err = " ".join(result.stderr.split())
    assert result.code == 2 and "merge.yaml:12 (tokenizer.tokens.q)" in err and "'some/other' is not an input" in err


# ---- chat templates ------------------------------------------------------------------------------------------------
T1 = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
T2 = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"


@pytest.fixture(scope="module")
def templated(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    toks = ["u", "hi"]
    return {n: vocab_model(root, n, toks, k or None, chat_template=t) for k, (n, t) in enumerate({"p": T2, "q": T1, "r": T1}.items())}


@pytest.mark.parametrize(
    "setting, rendered",
    [
        ("auto", "<user>hi"),  # T1 is shared by two of three models
        ("chatml", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
        (json.dumps(T2), "[hi]"),
    ],
)
def test_chat_template_lands_in_the_output(templated, tmp_path, run_cli, setting, rendered):
    from transformers import AutoTokenizer

    entries = "".join(f"  - model: {templated[n]}\n    parameters: {{weight: 1}}\n" for n in "pqr")
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n{entries}chat_template: {setting}\n")
    out = tmp_path / "out"
    result = run_cli("merge", cfg, out)
    assert result.code == 0, result.stderr
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    add = setting == "chatml"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=add) == rendered


def test_every_builtin_template_renders():
    from jinja2 import Environment

    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    for name, text in BUILTIN_TEMPLATES.items():
        out = Environment().from_string(text).render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
        assert "U" in out and "A" in out, name


def test_unknown_chat_template_name_is_a_clear_error(templated, tmp_path, run_cli):
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {templated['p']}\n    parameters: {{weight: 1}}\nchat_template: chatmlx\n")
    result = run_cli("merge", cfg, tmp_path / "out")
    assert result.code == 2 and "chatmlx" in result.stderr and "chatml" in result.stderr


# ---- LoRA ----------------------------------------------------------------------------------------------------------
TARGETS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head")


def write_adapter(folder: Path, base: Path, r: int = 2, alpha: float = 6.0, **cfg) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    folder.mkdir(parents=True, exist_ok=True)
    state = load_state_dict(base)
    gen = torch.Generator().manual_seed(3)
    pairs, tensors = {}, {}
    for module in TARGETS:
        out_f, in_f = state[f"{module}.weight"].shape
        a, b = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
        pairs[f"{module}.weight"] = (a, b)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "down_proj", "lm_head"], "fan_in_fan_out": False, **cfg}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return pairs


def folded(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A written plainly as the fold defines it: per element, the float64 products B[i, k] * A[k, j]
    added in order k = 0, 1, ..., times scale, plus W, rounded once to W's dtype."""
    terms = [b[:, k : k + 1].double() * a[k : k + 1].double() for k in range(a.shape[0])]
    return (functools.reduce(torch.add, terms) * scale + w.double()).to(w.dtype)


@pytest.mark.parametrize("rslora, budget", [(False, None), (False, "3K"), (True, None)])
def test_lora_fold_equals_w_plus_scaled_ba(models, tmp_path, run_cli, rslora, budget):
    pairs = write_adapter(tmp_path / "adapter", models["base"], use_rslora=rslora)
    cfg = write_config(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {models['base']}+{tmp_path / 'adapter'}\n")
    out = tmp_path / "out"
    result = run_cli("merge", cfg, out, *(["--memory-budget", budget] if budget else []))
    assert result.code == 0, result.stderr
    merged, base = load_state_dict(out), load_state_dict(models["base"])
    scale = 6.0 / (math.sqrt(2) if rslora else 2)
    for name, tensor in base.items():
        if name in pairs:
            a, b = pairs[name]
            assert torch.equal(merged[name], folded(tensor, a, b, scale)), name
            # and it is peft's W + scale * B @ A up to the float32 matmul's own rounding
            torch.testing.assert_close(merged[name], tensor + (b @ a) * scale, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(merged[name], tensor), name


def test_lora_fold_bytes_do_not_depend_on_rows_threads_or_budget(models, tmp_path, run_cli):
    """Row chunks of every size (budgets that cut the folded tensors at different rows), 1 and 2 torch threads: the
    same bytes. The fold is elementwise float64 in a fixed order, so no BLAS kernel choice can enter."""
    from mergeedit.io.lora import low_rank_product

    gen = torch.Generator().manual_seed(11)
    a, b = torch.randn(5, 37, generator=gen), torch.randn(29, 5, generator=gen) * 1e-3
    whole = low_rank_product(b, a, 0.7)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for step in (1, 2, 3, 7, 29):
                parts = torch.cat([low_rank_product(b[i : i + step], a, 0.7) for i in range(0, 29, step)])
                assert torch.equal(parts, whole), (n, step)
    finally:
        torch.set_num_threads(threads)

    write_adapter(tmp_path / "adapter", models["base"], r=8)
    cfg = write_config(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {models['base']}+{tmp_path / 'adapter'}\n")
    outputs, chunked = {}, {}
    for budget in ("1G", "40K", "11K", "3K", "1K"):
        dry = run_cli("merge", cfg, tmp_path / budget, "--memory-budget", budget, "--dry-run")
        chunked[budget] = int(re.search(r"(\d+) tensor\(s\) in row chunks", dry.stdout).group(1))
        assert run_cli("merge", cfg, tmp_path / budget, "--memory-budget", budget).code == 0
        outputs[budget] = load_state_dict(tmp_path / budget)
    assert chunked["1G"] == 0 and len(set(chunked.values())) >= 3, chunked  # the budgets really cut differently
    reference = outputs.pop("1G")
    for budget, state in outputs.items():
        for name in TARGETS:
            assert torch.equal(state[f"{name}.weight"], reference[f"{name}.weight"]), (budget, name)


def test_lora_merge_loads_with_transformers(models, tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    write_adapter(tmp_path / "adapter", models["base"])
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['base']}+{tmp_path / 'adapter'}\n    parameters: {{weight: 1}}\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n")
    assert run_cli("merge", cfg, tmp_path / "out").code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)


def test_lora_fan_in_fan_out_reads_transposed_weights(tmp_path):
    from mergeedit.io.lora import load_adapter
    from mergeedit.io.safetensors_header import read_header
    from mergeedit.io.source_reader import StoredTensor, read_input
    from mergeedit.io.tensor_reader import TensorReader

    w = torch.randn(6, 4)  # Conv1D layout: (in, out)
    save_file({"h.0.attn.c_attn.weight": w}, tmp_path / "model.safetensors")
    a, b = torch.randn(2, 6), torch.randn(4, 2)
    (tmp_path / "ad").mkdir()
    save_file({"base_model.model.h.0.attn.c_attn.lora_A.weight": a, "base_model.model.h.0.attn.c_attn.lora_B.weight": b}, tmp_path / "ad" / "adapter_model.safetensors")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "fan_in_fan_out": True}))
    tensors, _ = read_header(tmp_path / "model.safetensors")
    update = load_adapter(tmp_path / "ad", tensors)["h.0.attn.c_attn.weight"]
    with TensorReader() as reader:
        stored = StoredTensor(tensors["h.0.attn.c_attn.weight"], update)
        whole = read_input(reader, stored, None, None)
        rows = read_input(reader, stored, None, (2, 5))
    assert torch.equal(whole, folded(w.t(), a, b, 1.0).t())
    assert torch.equal(rows, whole[2:5])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bin": True}, "adapter_model.bin"),
        ({"embedding": True}, "embedding LoRA"),
    ],
)
def test_unsupported_adapters_are_clear_errors(models, tmp_path, run_cli, change, message):
    ad = tmp_path / "adapter"
    write_adapter(ad, models["base"], **{k: v for k, v in change.items() if k in ("use_dora", "modules_to_save")})
    if change.get("bin"):
        (ad / "adapter_model.safetensors").rename(ad / "adapter_model.bin")
    if change.get("embedding"):
        save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 128)}, ad / "adapter_model.safetensors")
    cfg = write_config(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {models['base']}+{ad}\n")
    result = run_cli("merge", cfg, tmp_path / "out")
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_union_with_a_tied_model_permutes_its_embedding_as_the_head(vocab_models, tmp_path, run_cli):
    tied = build_llama(tmp_path / "tied", LlamaShape(**SMALL, vocab=4, tied=True), variant=7, noise=0.5, shards=1)
    save_tokenizer(tied, VOCABS["m2"])
    models = {"base": vocab_models["base"], "m1": vocab_models["m1"], "m2": tied}
    out = tmp_path / "out"
    assert run_cli("merge", union_config(tmp_path, models, "tokenizer_source: union\n"), out).code == 0
    merged = load_state_dict(out)
    head_rows = rows_of(models, HEAD, tensors={"m2": EMBED})  # the tied model's head is its embedding
    expected = auto_rows(head_rows)
    for i, token in enumerate(UNION):
        torch.testing.assert_close(merged[HEAD][i], linear(expected, token), rtol=0, atol=1e-6)
