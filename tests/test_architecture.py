"""Tensor roles from names alone, for the decoder families people merge (no per-architecture definition files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeedit.io.architecture import layer_count, parse_layer_name, split_roles, tied_embedding_name
from mergeedit.io.model_source import ModelSource


def _model(names: list[str]) -> ModelSource:
    return ModelSource(ref="m", path=Path("/nonexistent"), tensors={n: None for n in names})


def _layer(prefix: str, rests: list[str], layers: int = 2) -> list[str]:
    return [f"{prefix}.{i}.{r}" for i in range(layers) for r in rests]


LLAMA_MLP = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
ATTN = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"]
NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]

FAMILIES = {
    # family: (names, pre, post, tied embedding (when lm_head is absent))
    "llama/mistral": (
        ["model.embed_tokens.weight", *_layer("model.layers", ATTN + LLAMA_MLP + NORMS), "model.norm.weight", "lm_head.weight"],
        ["model.embed_tokens.weight"], ["model.norm.weight", "lm_head.weight"], None,
    ),
    "qwen2 (biases)": (
        ["model.embed_tokens.weight", *_layer("model.layers", ATTN + ["self_attn.q_proj.bias"] + LLAMA_MLP + NORMS), "model.norm.weight"],
        ["model.embed_tokens.weight"], ["model.norm.weight"], "model.embed_tokens.weight",
    ),
    "qwen3 (q/k norms)": (
        ["model.embed_tokens.weight", *_layer("model.layers", ATTN + ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] + LLAMA_MLP + NORMS), "model.norm.weight"],
        ["model.embed_tokens.weight"], ["model.norm.weight"], "model.embed_tokens.weight",
    ),
    "gemma2/3 text": (
        ["model.embed_tokens.weight", *_layer("model.layers", ATTN + LLAMA_MLP + NORMS + ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]), "model.norm.weight"],
        ["model.embed_tokens.weight"], ["model.norm.weight"], "model.embed_tokens.weight",
    ),
    "gemma3 multimodal wrapper": (
        ["language_model.model.embed_tokens.weight", *_layer("language_model.model.layers", ATTN + LLAMA_MLP), "language_model.model.norm.weight"],
        ["language_model.model.embed_tokens.weight"], ["language_model.model.norm.weight"], "language_model.model.embed_tokens.weight",
    ),
    "phi3 (fused qkv, gate_up)": (
        ["model.embed_tokens.weight", *_layer("model.layers", ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"] + NORMS), "model.norm.weight", "lm_head.weight"],
        ["model.embed_tokens.weight"], ["model.norm.weight", "lm_head.weight"], None,
    ),
    "gpt2": (
        ["transformer.wte.weight", "transformer.wpe.weight", *_layer("transformer.h", ["ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]), "transformer.ln_f.weight", "transformer.ln_f.bias"],
        ["transformer.wte.weight", "transformer.wpe.weight"], ["transformer.ln_f.weight", "transformer.ln_f.bias"], "transformer.wte.weight",
    ),
    "mixtral (experts)": (
        ["model.embed_tokens.weight", *_layer("model.layers", ATTN + NORMS + ["block_sparse_moe.gate.weight"] + [f"block_sparse_moe.experts.{e}.w{k}.weight" for e in range(4) for k in (1, 2, 3)]), "model.norm.weight", "lm_head.weight"],
        ["model.embed_tokens.weight"], ["model.norm.weight", "lm_head.weight"], None,
    ),
    "qwen moe (shared expert)": (
        ["model.embed_tokens.weight", *_layer("model.layers", ATTN + NORMS + ["mlp.gate.weight", "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert_gate.weight"] + [f"mlp.experts.{e}.up_proj.weight" for e in range(3)]), "model.norm.weight", "lm_head.weight"],
        ["model.embed_tokens.weight"], ["model.norm.weight", "lm_head.weight"], None,
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_roles_from_names(family):
    names, pre, post, tied = FAMILIES[family]
    model = _model(names)
    assert layer_count(model) == 2
    assert split_roles(model) == (pre, post)
    if "lm_head.weight" not in names:
        assert tied_embedding_name(model) == tied


def test_expert_index_is_not_mistaken_for_the_layer_index():
    name = parse_layer_name("model.layers.7.block_sparse_moe.experts.3.w1.weight")
    assert (name.prefix, name.index, name.rest) == ("model.layers", 7, "block_sparse_moe.experts.3.w1.weight")
    assert name.at(12) == "model.layers.12.block_sparse_moe.experts.3.w1.weight"
    gpt2 = parse_layer_name("transformer.h.11.mlp.c_fc.weight")
    assert (gpt2.prefix, gpt2.index) == ("transformer.h", 11)
