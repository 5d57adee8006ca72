"""The recipe's evaluation stages: reference outputs of the unedited model, then every edit scored on the final one."""

from __future__ import annotations

from ..editing.prompts import PromptFormat
from ..editing.records import EditRecord
from ..evaluation.evaluate import evaluate_edits, reference_outputs


def _labelled(result) -> dict:
    return {name: {"value": agg["mean"], "protocol": agg["protocol"], "n": agg["n"]} for name, agg in result.aggregate.items() if agg["mean"] is not None}


def _eval(model, tokenizer, records, fmt: PromptFormat, cfg, pre=None):
    return evaluate_edits(
        model, tokenizer, records, pre=pre, generation=cfg.generation, chat_template=fmt.uses_chat, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens
    )


def pre_edit_outputs(model, tokenizer, records: list[EditRecord], fmt: PromptFormat, cfg) -> dict:
    """Locality reference tokens, the unedited model's scores, and its answers (for before/after examples)."""
    result = _eval(model, tokenizer, records, fmt, cfg)
    answers = {r["case_id"]: r.get("answers", {}).get("rel", "") for r in result.records}
    return {"locality": reference_outputs(model, tokenizer, records, batch_size=cfg.batch_size), "metrics": _labelled(result), "answers": answers}


def post_edit_evaluation(model, tokenizer, records: list[EditRecord], fmt: PromptFormat, cfg, pre: dict | None) -> dict:
    result = _eval(model, tokenizer, records, fmt, cfg, pre=pre["locality"] if pre else None)
    before = (pre or {}).get("answers", {})
    examples = [
        {"case_id": r.case_id, "prompt": r.prompt, "target": r.target, "before": before.get(r.case_id, ""), "after": rec.get("answers", {}).get("rel", "")}
        for r, rec in zip(records[: cfg.examples], result.records[: cfg.examples])
    ]
    return {"metrics": _labelled(result), "per_edit": result.records, "examples": examples}
