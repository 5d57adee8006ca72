"""`mergeedit eval MODEL --dataset FILE`: score any model folder on edit records, as a recipe's eval stage does.

With `--reference` it also measures general-ability drift (perplexity change and next-token KL on a generic text
set, evaluation/drift.py); with `--lm-eval-task` it runs a local lm-evaluation-harness task on both models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def evaluate_folder(
    model_ref: str,
    dataset: Optional[Path],
    fmt: str,
    *,
    reference: Optional[str] = None,
    limit: Optional[int] = None,
    generation: bool = True,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    device: str = "auto",
    drift: bool = True,
    drift_texts: Optional[Path] = None,
    lm_eval_task: Optional[Path] = None,
    lm_eval_limit: Optional[int] = None,
    system_prompt: Optional[str] = None,
) -> dict:
    """Per-edit and aggregate scores (when `dataset` is given); locality and drift need `reference` (the unedited
    model) to compare against. Keys: aggregate, settings, records, and drift / lm_eval when measured. `system_prompt`:
    the chat forms (generation, `loc_chat`, on both models) ask with it, as a recipe's `dataset.system_prompt` trains."""
    from ..editing.datasets import load_edits
    from ..editing.prompts import has_chat_template
    from ..models.loading import load_model_and_tokenizer, pick_device, resolve_base_folder
    from . import drift as drift_metrics
    from .evaluate import evaluate_edits, reference_outputs

    if lm_eval_task is not None:  # first: a missing extra or a bad task file fails before any model loads
        _check_lm_eval_task(lm_eval_task)
    records = [r.__class__(**{**r.__dict__, "target": r.target.strip()}) for r in load_edits(dataset, fmt, limit=limit)] if dataset else []
    texts = drift_metrics.load_drift_texts(drift_texts) if drift and reference is not None else None
    dev = pick_device(device)
    pre = pre_chat = drift_ref = None
    if reference is not None:
        ref_folder = resolve_base_folder(reference, Path.cwd())
        ref_model, ref_tok = load_model_and_tokenizer(ref_folder, "float32", dev)
        if records:
            pre = reference_outputs(ref_model, ref_tok, records, batch_size=batch_size)
            if has_chat_template(ref_tok):  # the probes in the chat form too (loc_chat)
                pre_chat = reference_outputs(ref_model, ref_tok, records, batch_size=batch_size, chat=True, system_prompt=system_prompt)
        if texts is not None:
            drift_ref = drift_metrics.drift_reference(ref_model, ref_tok, texts, batch_size=batch_size)
        del ref_model
    folder = resolve_base_folder(model_ref, Path.cwd())
    model, tokenizer = load_model_and_tokenizer(folder, "float32", dev)
    out: dict = {"aggregate": {}, "settings": {}, "records": []}
    with torch.no_grad():
        if records:
            out = evaluate_edits(
                model, tokenizer, records, pre=pre, pre_chat=pre_chat if has_chat_template(tokenizer) else None, generation=generation,
                batch_size=batch_size, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
            ).to_dict()
        if drift_ref is not None:
            out["drift"] = drift_metrics.drift_scores(model, tokenizer, texts, drift_ref, batch_size=batch_size)
    if lm_eval_task is not None:
        del model
        folders = {"model": folder, **({"reference": ref_folder} if reference is not None else {})}
        out["lm_eval"] = _run_lm_eval(folders, lm_eval_task, lm_eval_limit, batch_size, str(dev))
    return out


def _check_lm_eval_task(task: Path) -> None:
    """The lm-eval extra is installed and the task file localizes (its data files exist): one line if not."""
    import tempfile

    from .lm_eval_task import import_lm_eval, localize_task

    import_lm_eval()
    with tempfile.TemporaryDirectory() as tmp:
        localize_task(task, Path(tmp))


def _run_lm_eval(folders: dict[str, Path], task: Path, limit: Optional[int], batch_size: int, device: str) -> dict:
    """The lm-eval task's results on each folder ("model", and "reference" when given)."""
    from .lm_eval_task import run_lm_eval_task

    return {who: run_lm_eval_task(folder, task, limit=limit, batch_size=batch_size, device=device) for who, folder in folders.items()}
