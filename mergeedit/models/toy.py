"""Small Llama-style checkpoints built locally: for the demo, the tests and the benchmarks (no download).

Written with the reference `safetensors` library (not our writer), as sharded Hugging Face folders that
`LlamaForCausalLM.from_pretrained` loads. A "fine-tune" is the base plus seeded noise, so models built from the same
base seed share a base and differ like fine-tunes do.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import save_file

from ..merging.methods.seeded_random import derive_seed


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY = LlamaShape()
# The 170M-parameter fp32 shape of the throughput benchmark (about 650 MB per model).
BENCH_170M = LlamaShape(hidden=768, intermediate=3072, layers=12, heads=12, kv_heads=12, vocab=32000)


def tensor_shapes(shape: LlamaShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    yield "model.embed_tokens.weight", (shape.vocab, h)
    for n in range(shape.layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not shape.tied:
        yield "lm_head.weight", (shape.vocab, h)


def parameter_count(shape: LlamaShape) -> int:
    return sum(math.prod(s) for _, s in tensor_shapes(shape))


def _normal(name: str, dims: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(dims, generator=torch.Generator().manual_seed(derive_seed(seed, name)))


def toy_tensor(name: str, dims: tuple[int, ...], base_seed: int, variant: Optional[int], noise: float) -> torch.Tensor:
    """Norms sit near 1 (std 0.05), matrices have std 0.02; a variant adds `noise` times that std of fresh noise."""
    std = 0.05 if len(dims) == 1 else 0.02
    x = std * _normal(name, dims, base_seed)
    if len(dims) == 1:
        x += 1.0
    if variant is not None:
        x += (noise * std) * _normal(name, dims, derive_seed(base_seed, "variant", variant))
    return x


def llama_config(shape: LlamaShape, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": shape.tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": str(dtype).removeprefix("torch."),
    }


def build_llama(
    folder: Path,
    shape: LlamaShape = TINY,
    *,
    base_seed: int = 0,
    variant: Optional[int] = None,
    noise: float = 0.01,
    dtype: torch.dtype = torch.float32,
    shards: int = 3,
) -> Path:
    """Write a sharded HF folder; `variant=None` is the base, an int gives a fine-tune-like perturbation of it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = list(tensor_shapes(shape))
    total = sum(math.prod(s) for _, s in entries)
    per_shard = math.ceil(total / shards)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in entries:
        if groups[-1] and size + math.prod(dims) > per_shard and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += math.prod(dims)
    weight_map = {}
    total_bytes = 0
    for k, group in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: toy_tensor(n, d, base_seed, variant, noise).to(dtype) for n, d in group}
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total_bytes += t.numel() * t.element_size()
        del tensors
    if len(groups) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(llama_config(shape, dtype), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (folder / "toy_model.json").write_text(json.dumps({"shape": asdict(shape), "base_seed": base_seed, "variant": variant, "noise": noise}))
    return folder


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder, via the reference safetensors loader (for tests and reference merges)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
