"""Tensor roles inferred from Hugging Face tensor names, instead of one definition file per architecture.

A tensor is a *layer* tensor when its name has a numbered block (`model.layers.7.mlp.up_proj.weight`); every other
tensor is *pre* (embeddings, which come before the first layer) or *post* (final norm, lm_head).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ..core.errors import MergeEditError
from .model_source import ModelSource

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")
TIED_HEAD = "lm_head.weight"
EMBED_CANDIDATES = ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight", "embed_tokens.weight")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str

    def at(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


def parse_layer_name(name: str) -> LayerName | None:
    m = _LAYER.match(name)
    return LayerName(m["prefix"], int(m["index"]), m["rest"]) if m else None


def is_pre_weight(name: str) -> bool:
    return any(h in name for h in _PRE_HINTS)


def layer_count(model: ModelSource) -> int:
    """Number of numbered blocks, from the tensor names (the config may disagree after a bad export; names win)."""
    indices = {p.index for p in map(parse_layer_name, model.tensors) if p}
    return max(indices) + 1 if indices else 0


def layer_tensors(model: ModelSource, index: int) -> list[LayerName]:
    """The tensors of block `index`, in file order."""
    return [p for p in map(parse_layer_name, model.tensors) if p and p.index == index]


def split_roles(model: ModelSource) -> tuple[list[str], list[str]]:
    """Non-layer tensor names split into (pre, post)."""
    others = [n for n in model.tensors if parse_layer_name(n) is None]
    return [n for n in others if is_pre_weight(n)], [n for n in others if not is_pre_weight(n)]


def tied_embedding_name(model: ModelSource) -> str | None:
    """The embedding a model without `lm_head.weight` ties its head to: a known name, else the one non-layer tensor
    named like a token embedding (wrapped models such as Gemma 3's `language_model.model.embed_tokens.weight`)."""
    known = next((n for n in EMBED_CANDIDATES if n in model.tensors), None)
    if known is not None:
        return known
    found = [n for n in model.tensors if parse_layer_name(n) is None and n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))]
    return found[0] if len(found) == 1 else None


def check_head(model: ModelSource) -> None:
    """A model without `lm_head.weight` whose config says `tie_word_embeddings: false` has lost its head: refused,
    instead of taking its embeddings as the head (only a tied model's head is its embeddings)."""
    cfg = model.config or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    if TIED_HEAD in model.tensors or tie is not False or tied_embedding_name(model) is None:
        return
    raise MergeEditError(
        f"{model.path}: has no {TIED_HEAD} and its config.json says tie_word_embeddings: false, so its output head is missing "
        "(the embeddings are not its head); re-export the model with its lm_head, or set tie_word_embeddings: true if it is tied"
    )


# Linear weights that read one input tensor, by their Hugging Face names: an MLP's gate and up projections (Llama's
# gate_proj/up_proj, Mixtral's w1/w3) and attention's q/k/v. At run time the null space finds the same sharing from
# tensor identity (editing.null_space.input_second_moments; a test holds the two to agree on a Llama-shaped model).
_SAME_INPUT = {"gate_proj": "mlp-in", "up_proj": "mlp-in", "w1": "mlp-in", "w3": "mlp-in", "q_proj": "attn-in", "k_proj": "attn-in", "v_proj": "attn-in"}


def input_key(name: str) -> tuple[str, str]:
    """(owner module's parent path, input group) of a weight: two weights with the same key read the same input
    tensor. A name not known to share counts as its own input (so a count over keys is an upper bound)."""
    parent, _, leaf = name.removesuffix(".weight").rpartition(".")
    return parent, _SAME_INPUT.get(leaf, leaf)


def guess_architecture(model: ModelSource) -> str:
    archs = (model.config or {}).get("architectures")
    if archs:
        return str(archs[0])
    names = list(model.tensors)
    rests = Counter(p.rest for p in map(parse_layer_name, names) if p)
    if any("gate_proj" in r for r in rests):
        return "Llama-like (gate/up/down MLP, inferred from names)"
    if any(r.startswith("attn.c_attn") for r in rests):
        return "GPT-2-like (inferred from names)"
    return "unknown (no config.json architectures)"
