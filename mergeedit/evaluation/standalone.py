"""`mergeedit eval MODEL --dataset FILE`: score any model folder on edit records, as a recipe's eval stage does."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def evaluate_folder(
    model_ref: str,
    dataset: Path,
    fmt: str,
    *,
    reference: Optional[str] = None,
    limit: Optional[int] = None,
    generation: bool = True,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    device: str = "auto",
) -> dict:
    """Per-edit and aggregate scores; locality needs `reference` (the unedited model) to compare against."""
    from ..editing.datasets import load_edits
    from ..pipeline.model_loading import load_model_and_tokenizer, pick_device, resolve_base_folder
    from .evaluate import evaluate_edits, reference_outputs

    records = [r.__class__(**{**r.__dict__, "target": r.target.strip()}) for r in load_edits(dataset, fmt, limit=limit)]
    dev = pick_device(device)
    pre = None
    if reference is not None:
        ref_model, ref_tok = load_model_and_tokenizer(resolve_base_folder(reference, Path.cwd()), "float32", dev)
        pre = reference_outputs(ref_model, ref_tok, records, batch_size=batch_size)
        del ref_model
    model, tokenizer = load_model_and_tokenizer(resolve_base_folder(model_ref, Path.cwd()), "float32", dev)
    with torch.no_grad():
        result = evaluate_edits(model, tokenizer, records, pre=pre, generation=generation, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return result.to_dict()
