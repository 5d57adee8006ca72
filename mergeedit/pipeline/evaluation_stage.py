"""The recipe's evaluation stages: reference outputs of the unedited model, then every edit scored on the final one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..editing.prompts import PromptFormat
from ..editing.records import EditRecord
from ..evaluation import drift as drift_metrics
from ..evaluation.curves import EDIT_METRICS
from ..evaluation.evaluate import evaluate_edits, metric, reference_outputs

DRIFT = "drift vs reference"


def _labelled(result) -> dict:
    return {name: agg for name, agg in result.aggregate.items() if agg["value"] is not None}


def _references(pre: dict | None) -> dict:
    """evaluate_edits' locality references from a pre-eval stage's output (none before it exists)."""
    return {"pre": (pre or {}).get("locality"), "pre_chat": (pre or {}).get("locality_chat")}


def _eval(model, tokenizer, records, fmt: PromptFormat, cfg, pre=None):
    """The edits scored as the run asks them: the chat forms (generation, `loc_chat`) with the run's system prompt."""
    return evaluate_edits(
        model, tokenizer, records, **_references(pre), generation=cfg.generation, chat_template=fmt.uses_chat, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
        system_prompt=fmt.system_prompt,
    )


def pre_edit_outputs(model, tokenizer, records: list[EditRecord], fmt: PromptFormat, cfg) -> dict:
    """Locality reference tokens (plain, and in the chat form when the run trains in it), the unedited model's
    scores, and its answers (for before/after examples)."""
    result = _eval(model, tokenizer, records, fmt, cfg)
    answers = {r["case_id"]: r.get("answers", {}).get("rel", "") for r in result.records}
    out = {"locality": reference_outputs(model, tokenizer, records, batch_size=cfg.batch_size), "metrics": _labelled(result), "answers": answers}
    if fmt.uses_chat:
        out["locality_chat"] = reference_outputs(model, tokenizer, records, batch_size=cfg.batch_size, chat=True, system_prompt=fmt.system_prompt)
    return out


@dataclass
class DriftSetup:
    """The drift text set, the unedited model's reference on it, and the id of the stage that cached it."""

    texts: drift_metrics.DriftTexts
    reference: drift_metrics.DriftReference
    stage_id: str

    def reference_metrics(self) -> dict:
        """The unedited model's side, for the before column: its perplexity, zero drift and zero KL."""
        n = len(self.texts.texts)
        return {
            "ppl": metric(self.reference.ppl["ppl"], DRIFT, n),
            "ppl_drift_pct": metric(0.0, DRIFT, n),
            "kl": metric(0.0, DRIFT, len(self.texts.prompts)),
        }

    def metrics(self, model, tokenizer, batch_size: int) -> tuple[dict, dict]:
        """(labelled metrics, full drift scores) of `model` against the reference."""
        scores = drift_metrics.drift_scores(model, tokenizer, self.texts, self.reference, batch_size=batch_size)
        labelled = {
            "ppl": metric(scores["ppl"], DRIFT, scores["texts"]),
            "ppl_drift_pct": metric(scores["ppl_drift_pct"], DRIFT, scores["texts"]),
            "kl": metric(scores["kl"], DRIFT, scores["prompts"]),
        }
        return labelled, scores


def drift_texts_path(cfg, recipe_dir: Path) -> Path:
    if cfg.drift_texts is None:
        return drift_metrics.DEFAULT_DRIFT_TEXTS
    path = Path(cfg.drift_texts)
    return path if path.is_absolute() else recipe_dir / path


def drift_reference_stage(run, base_key: dict, model, tokenizer, cfg, recipe_dir: Path, result) -> DriftSetup | None:
    """Stage `pre-drift`: the unedited model's perplexity and next-token log-probs on the drift set, cached.

    None (with a note) when the recipe names no text set and the shipped one is absent (an install without data/)."""
    from .run_dir import stable_hash

    path = drift_texts_path(cfg, recipe_dir)
    if cfg.drift_texts is None and not path.is_file():
        result.notes.append(f"no drift scores: the shipped text set {path} is not installed; set eval.drift_texts")
        return None
    texts = drift_metrics.load_drift_texts(path)
    inputs = {"base": base_key, "texts": stable_hash([texts.prompts, texts.texts]), "batch_size": cfg.batch_size}

    def write(tmp: Path) -> None:
        drift_metrics.save_reference(drift_metrics.drift_reference(model, tokenizer, texts, batch_size=cfg.batch_size), tmp)

    stage = run.produce("pre-drift", inputs, write, detail=f"{len(texts.texts)} texts from {path.name}")
    return DriftSetup(texts, drift_metrics.load_reference(stage.path), stage.output_id)


def post_edit_evaluation(model, tokenizer, records: list[EditRecord], fmt: PromptFormat, cfg, pre: dict | None, drift: DriftSetup | None = None) -> dict:
    result = _eval(model, tokenizer, records, fmt, cfg, pre=pre)
    before = (pre or {}).get("answers", {})
    examples = [
        {"case_id": r.case_id, "prompt": r.prompt, "target": r.target, "before": before.get(r.case_id, ""), "after": rec.get("answers", {}).get("rel", "")}
        for r, rec in zip(records[: cfg.examples], result.records[: cfg.examples])
    ]
    out = {"metrics": _labelled(result), "per_edit": result.records, "examples": examples}
    if drift is not None:
        labelled, scores = drift.metrics(model, tokenizer, cfg.batch_size)
        out["metrics"].update(labelled)
        out["drift"] = scores
    return out


def curve_point(model, tokenizer, records: list[EditRecord], fmt: PromptFormat, cfg, pre: dict | None, drift: DriftSetup | None, *, batch: int) -> dict:
    """One point of a sequential curve: teacher-forced rel/gen/loc (and loc_chat) on the edits so far (no generation:
    kept cheap), plus drift when the recipe measures it."""
    result = evaluate_edits(model, tokenizer, records, **_references(pre), generation=False, batch_size=cfg.batch_size, system_prompt=fmt.system_prompt)
    scores = drift.metrics(model, tokenizer, cfg.batch_size)[1] if drift is not None else None
    return _point(batch, len(records), result.summary(), scores)


def final_curve_point(post: dict, *, batch: int, edits: int) -> dict:
    """The curve's last point, read from the final evaluation (`post_edit_evaluation`'s output): the same model on
    every edit, so the same teacher-forced scores and drift a curve stage would compute, without a second pass."""
    summary = {k: v["value"] for k, v in post["metrics"].items()}
    return _point(batch, edits, summary, post.get("drift"))


def _point(batch: int, edits: int, summary: dict, drift: dict | None) -> dict:
    point = {"batch": batch, "edits": edits, **{k: summary.get(k) for k in EDIT_METRICS}}
    if drift is not None:
        point.update(ppl=drift["ppl"], ppl_drift_pct=drift["ppl_drift_pct"], kl=drift["kl"])
    return point
