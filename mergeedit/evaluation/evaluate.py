"""Score edited models on edit records: reliability, generalization, locality, portability, generation EM, fluency.

Protocol (sequential editing, WISE/AlphaEdit): call `reference_outputs` on the UNEDITED model, apply every edit, then
call `evaluate_edits` once on the final model with ``pre=`` those reference outputs. Each number is labelled with
its protocol:

- "teacher-forced": rel (edit prompt -> target), gen (mean over rephrases -> target), port (mean over portability
  probes -> probe answer, post-edit model only); token accuracy with partial credit (metrics.teacher_forced_accuracy).
- "pre-vs-post": loc, the mean over locality probes of mean(pre argmax == post argmax) on ``probe.prompt + " " +
  probe.answer``; it measures unchanged behaviour, not correctness (not ROME/MEMIT "specificity"). loc_chat is the
  same on the chat form R-SFT trains and a chat user asks in (the probe's question as a user turn, its answer as the
  assistant's; metrics.chat_teacher_forced_tokens), from ``reference_outputs(..., chat=True)``: an edit method that
  changes the model's chat answers while leaving plain text alone shows here and not in loc.
- "generation": rel_em / gen_em, SQuAD exact match of the greedy answer to the question alone against the target
  (metrics.generate_answers); fluency, the n-gram entropy of a greedy continuation of the edit prompt.

Per-edit aggregates are means over that edit's probes; the aggregate is the mean over edits that have the metric
(an edit without rephrases has gen None and does not count towards the gen mean).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

from ..core.errors import MergeEditError
from ..editing.prompts import has_chat_template
from ..editing.records import EditRecord
from . import metrics

__all__ = ["EvalResult", "PROTOCOLS", "reference_outputs", "evaluate_edits"]

TEACHER_FORCED = "teacher-forced"
GENERATION = "generation"
PRE_VS_POST = "pre-vs-post"

# metric -> protocol, in report order
PROTOCOLS: dict[str, str] = {
    "rel": TEACHER_FORCED,
    "gen": TEACHER_FORCED,
    "loc": PRE_VS_POST,
    "loc_chat": PRE_VS_POST,
    "port": TEACHER_FORCED,
    "rel_em": GENERATION,
    "gen_em": GENERATION,
    "fluency": GENERATION,
}


def metric(value: float | None, protocol: str, n: int) -> dict:
    """The one shape of a metric everywhere (evaluation results, run stages, model cards, CLI tables, JSON):
    its value (None when nothing was scored), the protocol that produced it, and how many items it averages."""
    return {"value": value, "protocol": protocol, "n": n}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class EvalResult:
    """Per-edit scores (`records`, one dict per edit, input order) and their means (`aggregate`, per metric:
    a `metric` record ``{"value", "protocol", "n"}``; value None when no edit has the metric)."""

    records: list[dict]
    aggregate: dict[str, dict]
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"aggregate": self.aggregate, "settings": self.settings, "records": self.records}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def summary(self) -> dict[str, float | None]:
        """metric -> mean, for quick printing."""
        return {k: v["value"] for k, v in self.aggregate.items()}


def _check_unique(records: Sequence[EditRecord]) -> None:
    seen: set[str] = set()
    for r in records:
        if r.case_id in seen:
            raise MergeEditError(f"duplicate case_id {r.case_id!r} in the edit records: pre-edit outputs are keyed by case_id")
        seen.add(r.case_id)


def reference_outputs(
    model, tokenizer, records: Sequence[EditRecord], *, batch_size: int = 16, padding_side: str = "right", chat: bool = False,
    system_prompt: str | None = None,
) -> dict[str, list[list[int]]]:
    """Pre-edit argmax tokens per locality probe: ``{case_id: [[token ids] per locality probe]}``.

    Compute it on the UNEDITED model and pass it to `evaluate_edits(pre=...)`; with ``chat=True`` (the probes in the
    chat form, `system_prompt` as in training) pass it as ``pre_chat=``. Plain JSON-serialisable data.
    """
    _check_unique(records)
    flat = [(r.case_id, p) for r in records for p in r.locality]
    questions, answers = [p.prompt for _, p in flat], [p.answer for _, p in flat]
    if chat:
        tokens = metrics.chat_teacher_forced_tokens(model, tokenizer, questions, answers, batch_size=batch_size, padding_side=padding_side, system_prompt=system_prompt)
    else:
        tokens = metrics.teacher_forced_tokens(model, tokenizer, questions, answers, batch_size=batch_size, padding_side=padding_side)
    out: dict[str, list[list[int]]] = {r.case_id: [] for r in records}
    for (case_id, _), toks in zip(flat, tokens):
        out[case_id].append(toks)
    return out


def evaluate_edits(
    model,
    tokenizer,
    records: Sequence[EditRecord],
    *,
    pre: dict[str, list[list[int]]] | None = None,
    pre_chat: dict[str, list[list[int]]] | None = None,
    generation: bool = True,
    chat_template: bool | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    fluency: bool = False,
    fluency_tokens: int = 100,
    padding_side: str = "right",
    system_prompt: str | None = None,
) -> EvalResult:
    """Score every edit on the (edited) model. See the module docstring for the protocols.

    pre: `reference_outputs` of the unedited model on the same records; without it loc is None.
    pre_chat: `reference_outputs(..., chat=True)` of the unedited model (the same `system_prompt`); without it
    loc_chat is None.
    generation: also run the generation protocol (rel_em, gen_em and the answers).
    chat_template: for the generation protocol (None: use the tokenizer's template when it has one); the chat form
    has no template default system prompt unless `system_prompt` gives one (as in training).
    fluency: also greedily continue each edit prompt for `fluency_tokens` tokens (raw prompt, no chat template,
    stops only at EOS) and score its n-gram entropy.
    """
    records = list(records)
    _check_unique(records)
    _check_pre(records, pre)
    _check_pre(records, pre_chat)
    per = _teacher_forced_scores(model, tokenizer, records, pre, batch_size, padding_side)
    if pre_chat is not None:
        chat_post = reference_outputs(model, tokenizer, [r for r in records if r.locality], batch_size=batch_size, padding_side=padding_side, chat=True, system_prompt=system_prompt)
        for r, p in zip(records, per):
            p["loc_chat"] = metrics.locality(pre_chat[r.case_id], chat_post[r.case_id]) if r.locality else []
    answers_rel, answers_gen = _generated_answers(model, tokenizer, records, max_new_tokens, chat_template, batch_size, system_prompt) if generation else ([], [])
    continuations: list[str] = []
    if fluency:
        continuations = metrics.generate_continuations(
            model,
            tokenizer,
            [r.prompt for r in records],
            max_new_tokens=fluency_tokens,
            chat_template=False,
            batch_size=batch_size,
            stop_chars=(),
        )
    out_records = [
        _edit_record(r, per[i], pre, answers_rel[i] if generation else None, answers_gen[i] if generation else None, continuations[i] if fluency else None)
        for i, r in enumerate(records)
    ]
    aggregate: dict[str, dict] = {}
    for name, protocol in PROTOCOLS.items():
        values = [rec[name] for rec in out_records if rec[name] is not None]
        aggregate[name] = metric(_mean(values), protocol, len(values))
    settings = _settings(tokenizer, len(records), pre is not None, generation, chat_template, max_new_tokens, fluency, fluency_tokens, batch_size, padding_side, system_prompt)
    settings["pre_chat"] = pre_chat is not None
    return EvalResult(records=out_records, aggregate=aggregate, settings=settings)


def _check_pre(records: list[EditRecord], pre: dict[str, list[list[int]]] | None) -> None:
    """The pre-edit outputs cover every record's locality probes."""
    if pre is not None:
        for r in records:
            got = pre.get(r.case_id)
            if got is None and r.locality:
                raise MergeEditError(f"pre-edit outputs have no entry for case_id {r.case_id!r}: compute them on the same records")
            if r.locality and len(got) != len(r.locality):
                raise MergeEditError(
                    f"case_id {r.case_id!r}: {len(got)} pre-edit locality outputs for {len(r.locality)} locality probes"
                )


def _teacher_forced_scores(model, tokenizer, records: list[EditRecord], pre, batch_size: int, padding_side: str) -> list[dict]:
    """Per record: rel, gen and port token accuracies and the locality argmax tokens, from one flat teacher-forced
    pass over every probe (sorted into length batches inside)."""
    kinds: list[tuple[int, str]] = []  # (record index, "rel" | "gen" | "port" | "loc")
    prompts: list[str] = []
    targets: list[str] = []
    for i, r in enumerate(records):
        for kind, prompt, target in (
            [("rel", r.prompt, r.target)]
            + [("gen", q, r.target) for q in r.rephrases]
            + [("port", p.prompt, p.answer) for p in r.portability]
            + ([("loc", p.prompt, p.answer) for p in r.locality] if pre is not None else [])
        ):
            kinds.append((i, kind))
            prompts.append(prompt)
            targets.append(target)
    scored = metrics.teacher_forced_predictions(model, tokenizer, prompts, targets, batch_size, padding_side)

    per: list[dict] = [{"rel": [], "gen": [], "port": [], "loc_tokens": []} for _ in records]
    for (i, kind), (pred, gold) in zip(kinds, scored):
        if kind == "loc":
            per[i]["loc_tokens"].append(pred)
        else:
            per[i][kind].append(sum(int(p == g) for p, g in zip(pred, gold)) / len(gold))
    return per


def _generated_answers(model, tokenizer, records: list[EditRecord], max_new_tokens: int, chat_template, batch_size: int, system_prompt: str | None):
    """Greedy answers to every edit question: (one per record, the rephrases' per record)."""
    questions = [r.prompt for r in records] + [q for r in records for q in r.rephrases]
    answers = metrics.generate_answers(
        model, tokenizer, questions, max_new_tokens=max_new_tokens, chat_template=chat_template, batch_size=batch_size, system_prompt=system_prompt
    )
    answers_rel = answers[: len(records)]
    answers_gen: list[list[str]] = []
    pos = len(records)
    for r in records:
        answers_gen.append(answers[pos : pos + len(r.rephrases)])
        pos += len(r.rephrases)
    return answers_rel, answers_gen


def _edit_record(r: EditRecord, p: dict, pre, answer_rel: str | None, answers_gen: list[str] | None, continuation: str | None) -> dict:
    """One edit's scores (None where a protocol was not run) and what it answered."""
    loc_scores = metrics.locality(pre[r.case_id], p["loc_tokens"]) if pre is not None and r.locality else []
    rec: dict = {
        "case_id": r.case_id,
        "rel": p["rel"][0],
        "gen": _mean(p["gen"]),
        "loc": _mean(loc_scores),
        "loc_chat": _mean(p["loc_chat"]) if "loc_chat" in p else None,
        "port": _mean(p["port"]),
        "rel_em": None,
        "gen_em": None,
        "fluency": None,
        "scores": {"gen": p["gen"], "loc": loc_scores, "port": p["port"], **({"loc_chat": p["loc_chat"]} if "loc_chat" in p else {})},
    }
    if answer_rel is not None:
        rec["rel_em"] = metrics.exact_match(answer_rel, r.target)
        gen_em = [metrics.exact_match(a, r.target) for a in answers_gen]
        rec["gen_em"] = _mean(gen_em)
        rec["scores"]["gen_em"] = gen_em
        rec["answers"] = {"rel": answer_rel, "gen": answers_gen}
    if continuation is not None:
        rec["fluency"] = metrics.text_ngram_entropy(continuation)
        rec["continuation"] = continuation
    return rec


def _settings(tokenizer, n_edits: int, has_pre: bool, generation: bool, chat_template, max_new_tokens: int, fluency: bool,
              fluency_tokens: int, batch_size: int, padding_side: str, system_prompt: str | None = None) -> dict:
    """How the scores were made, stored with them."""
    return {
        "n_edits": n_edits,
        "pre": has_pre,
        "generation": generation,
        "chat_template": (has_chat_template(tokenizer) if chat_template is None else chat_template)
        if generation
        else None,
        "max_new_tokens": max_new_tokens if generation else None,
        "system_prompt": system_prompt,  # the chat forms' system turn (generation, loc_chat); None: the template's default left out
        "fluency_tokens": fluency_tokens if fluency else None,
        "batch_size": batch_size,
        "padding_side": padding_side,
        "conventions": {
            TEACHER_FORCED: "prompt + ' ' + target tokenized whole; argmax at the position before each target token; "
            "fraction of target tokens correct",
            PRE_VS_POST: "mean(pre-edit argmax == post-edit argmax) over the target positions of locality prompt + ' ' + answer "
            "(loc_chat: of the chat form, the prompt as a user turn and the answer as the assistant's)",
            GENERATION: "greedy answer to the question alone (chat form: no template default system prompt), cut at the "
            "first newline/period/EOS; SQuAD exact match",
        },
    }
