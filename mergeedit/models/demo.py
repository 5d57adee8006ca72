"""The README's first command: a real merge on small models built here, with no download.

Three Llama-style checkpoints (a base and two fine-tune-like variants, 3 shards each) are written, merged with TIES
through the same streaming engine as any merge, and the result is loaded back with transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .toy import LlamaShape, build_llama, load_state_dict

DEMO_SHAPE = LlamaShape(hidden=256, intermediate=688, layers=6, heads=8, kv_heads=4, vocab=4096)

CONFIG = """\
# A TIES merge of two fine-tunes into their base (mergekit's YAML, unchanged).
merge_method: ties
base_model: ./base
models:
  - model: ./finetune-a
    parameters:
      weight: 0.6
      density: [0.3, 0.7]      # a gradient over the layers
  - model: ./finetune-b
    parameters:
      weight: 0.4
      density:
        - filter: mlp          # filter list: MLP tensors keep more
          value: 0.6
        - value: 0.4
dtype: float32
"""


def build_inputs(folder: Path) -> Path:
    """Write the three input models and the config; return the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "base" / "config.json").exists():
        build_llama(folder / "base", DEMO_SHAPE, shards=3)
        build_llama(folder / "finetune-a", DEMO_SHAPE, variant=1, noise=0.3, shards=3)
        build_llama(folder / "finetune-b", DEMO_SHAPE, variant=2, noise=0.3, shards=3)
    config = folder / "ties.yaml"
    config.write_text(CONFIG)
    return config


def check_loads(merged: Path, inputs: Path) -> dict[str, float]:
    """Load the merge with transformers; report how much of the base it changed and how far its logits moved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    base = load_state_dict(inputs / "base")
    merged_state = load_state_dict(merged)
    changed = sum(int((merged_state[k] != base[k]).sum()) for k in base)
    total = sum(v.numel() for v in base.values())
    tokens = torch.tensor([[1, 17, 256, 1024, 99, 2]])
    with torch.no_grad():
        logits = model(tokens).logits
        model.load_state_dict(base, strict=False)
        base_logits = model(tokens).logits
    return {
        "parameters": float(total),
        "changed_fraction": changed / total,
        "logit_shift_vs_base": float((logits - base_logits).abs().max()),
    }
