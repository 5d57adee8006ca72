"""Read edit datasets (ZsRE, KnowEdit, CounterFact, QAEdit, MQuAKE, users' JSONL/CSV) into `EditRecord`s.

Every dataset is read the way EasyEdit reads it (see docs/editing-eval.md), so scores stay comparable. Text is kept
exactly as the file has it (no stripping); only emptiness is judged after stripping. Every problem the user can fix
raises `MergeEditError` with one line naming the file, the record and the key.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

from ..core.errors import MergeEditError
from ..core.text_files import json_type, read_json_array, read_jsonl, read_text_file
from ..core.yaml_source import did_you_mean
from .records import EditRecord, Probe

_log = logging.getLogger(__name__)

MAPPED_FIELDS = ("prompt", "target", "rephrases", "locality_prompt", "locality_answer", "subject", "ground_truth", "case_id")


class EditList(list):
    """The loaded edits; `skipped` holds the file record indices dropped for an empty target, for reports."""

    def __init__(self, edits: Iterable[EditRecord] = (), skipped: Iterable[int] = ()):
        super().__init__(edits)
        self.skipped = tuple(skipped)


class _Invalid(Exception):
    """One record's problem ("has no 'src' field"); `load_edits` adds the file, the record index and the fix."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


class _EmptyTarget(_Invalid):
    """A blank target: the record is skipped by default (the ZsRE eval file has two), else reported."""


# ---------------------------------------------------------------------------------------------- field helpers


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _missing(obj: dict, key: str, note: str = "", fix: str | None = None) -> _Invalid:
    """`has no 'src' field (it has: a, b)`: listing the keys present makes a wrong format or mapping obvious."""
    present = ", ".join(map(str, list(obj)[:12])) + (", ..." if len(obj) > 12 else "")
    details = "; ".join(part for part in (note, f"it has: {present}" if obj else "") if part)
    return _Invalid(f"has no {key!r} field" + (f" ({details})" if details else ""), fix)


def _dig(obj: Any, dotted: str, prefix: str = "") -> Any:
    """obj['a']['b'] for 'a.b'; a missing or null part is reported with the full key (and, at the top, the keys present)."""
    name = prefix + dotted
    for depth, key in enumerate(dotted.split(".")):
        if not isinstance(obj, dict):
            raise _Invalid(f"has {name!r} inside a {json_type(obj)}, not an object")
        if obj.get(key) is None:
            raise _missing(obj, name) if depth == 0 and not prefix else _Invalid(f"has no {name!r} field")
        obj = obj[key]
    return obj


def _opt(obj: Any, dotted: str) -> Any:
    """Like `_dig` but None when any part is absent (optional fields)."""
    for key in dotted.split("."):
        if not isinstance(obj, dict) or obj.get(key) is None:
            return None
        obj = obj[key]
    return obj


def _text(value: Any, key: str) -> str:
    """Strings pass; numbers become text (users' CSV/JSON answers like 1994); anything else is an error."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _Invalid(f"has {key!r} = {_short(value)}, which is not text")


def _first_text(value: Any, key: str) -> str:
    """The first string of an alias list, however nested (KnowEdit answers: "a", ["a", "b"] or [["a", "b"]])."""
    while isinstance(value, list):
        if not value:
            raise _Invalid(f"has an empty {key!r} list")
        value = value[0]
    return _text(value, key)


def _texts(value: Any, key: str) -> tuple[str, ...]:
    """A string or a list of strings as a tuple; None is empty (rephrases, lists of probe prompts)."""
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(_text(v, f"{key}[{i}]") for i, v in enumerate(value))
    return (_text(value, key),)


def _prompt(value: Any, key: str) -> str:
    text = _text(value, key)
    if not text.strip():
        raise _Invalid(f"has an empty {key!r}")
    return text


def _target(value: Any, key: str) -> str:
    text = _text(value, key)
    if not text.strip():
        raise _EmptyTarget(f"has an empty target ({key!r} is blank)")
    return text


def _opt_text(value: Any, key: str) -> str | None:
    return None if value is None else _text(value, key)


def _probes(prompts: Any, answers: Any, kind: str, keys: tuple[str, str]) -> tuple[Probe, ...]:
    """Pair locality prompts with answers (one each, or equal-length lists); one without the other is an error."""
    prompts, answers = _texts(prompts, keys[0]), _texts(answers, keys[1])
    if not prompts and not answers:
        return ()
    if len(answers) == 1 and len(prompts) > 1:
        answers = answers * len(prompts)
    if len(prompts) != len(answers):
        raise _Invalid(f"has {len(prompts)} {keys[0]!r} prompt(s) but {len(answers)} {keys[1]!r} answer(s)")
    return tuple(Probe(p, a, kind) for p, a in zip(prompts, answers))


def _case_id(record: dict, key: str, index: int) -> str:
    value = record.get(key)
    return str(index) if value is None else _text(value, key)


# ---------------------------------------------------------------------------------------------- parsers
# One per format: (raw record, its index in the file) -> the edits it holds (one, except MQuAKE).


def parse_zsre(record: dict, index: int) -> list[EditRecord]:
    """MEND's zsre_mend_eval.json: src -> alt, answers[0] the ground truth, one NQ locality probe."""
    answers = record.get("answers")
    return [
        EditRecord(
            case_id=str(index),
            prompt=_prompt(_dig(record, "src"), "src"),
            target=_target(_dig(record, "alt"), "alt"),
            subject=_opt_text(record.get("subject"), "subject"),
            ground_truth=None if answers is None else _first_text(answers, "answers"),
            rephrases=_texts(record.get("rephrase"), "rephrase"),
            locality=_probes(record.get("loc"), record.get("loc_ans"), "nq", ("loc", "loc_ans")),
        )
    ]


def _knowedit_probes(section: Any, name: str) -> tuple[Probe, ...]:
    """KnowEdit's {kind: [{prompt, ground_truth}, ...]}: a probe per item, first alias as the answer."""
    if section is None:
        return ()
    if not isinstance(section, dict):
        raise _Invalid(f"has {name!r} = {_short(section)}, expected an object of kind -> list of {{prompt, ground_truth}}")
    probes = []
    for kind, items in section.items():
        items = [items] if isinstance(items, dict) else items or []
        if not isinstance(items, list):
            raise _Invalid(f"has {name}.{kind} = {_short(items)}, expected a list of {{prompt, ground_truth}}")
        for k, item in enumerate(items):
            where = f"{name}.{kind}[{k}]"
            prompt = _first_text(_dig(item, "prompt", where + "."), where + ".prompt")
            probes.append(Probe(prompt, _first_text(_dig(item, "ground_truth", where + "."), where + ".ground_truth"), kind))
    return tuple(probes)


def parse_knowedit(record: dict, index: int) -> list[EditRecord]:
    """KnowEdit (ZsRE-test-all, wiki_counterfact, wiki_recent): probes grouped by kind, answers may be alias lists."""
    rephrase = record.get("rephrase_prompt", record.get("rephrase"))
    ground_truth = record.get("ground_truth")
    return [
        EditRecord(
            case_id=str(index),
            prompt=_prompt(_dig(record, "prompt"), "prompt"),
            target=_target(_first_text(_dig(record, "target_new"), "target_new"), "target_new"),
            subject=_opt_text(record.get("subject"), "subject"),
            ground_truth=None if ground_truth is None else _first_text(ground_truth, "ground_truth"),
            rephrases=_texts(rephrase, "rephrase_prompt"),
            locality=_knowedit_probes(record.get("locality"), "locality"),
            portability=_knowedit_probes(record.get("portability"), "portability"),
        )
    ]


def _rewrite_prompt(rewrite: dict, prefix: str) -> str:
    """ROME's cloze template with the subject filled in ('{}' -> subject)."""
    template = _prompt(_dig(rewrite, "prompt", prefix), prefix + "prompt")
    return template.replace("{}", _text(_dig(rewrite, "subject", prefix), prefix + "subject"))


def _rome_counterfact(record: dict, index: int) -> EditRecord:
    rewrite = _dig(record, "requested_rewrite")
    true = _opt(rewrite, "target_true.str")
    true = None if true is None else _text(true, "requested_rewrite.target_true.str")
    neighborhood = _texts(record.get("neighborhood_prompts"), "neighborhood_prompts")
    if neighborhood and true is None:
        raise _Invalid("has 'neighborhood_prompts' but no 'requested_rewrite.target_true.str' to answer them")
    return EditRecord(
        case_id=_case_id(record, "case_id", index),
        prompt=_rewrite_prompt(rewrite, "requested_rewrite."),
        target=_target(_dig(rewrite, "target_new.str", "requested_rewrite."), "requested_rewrite.target_new.str"),
        subject=_text(_dig(rewrite, "subject", "requested_rewrite."), "requested_rewrite.subject"),
        ground_truth=true,
        rephrases=_texts(record.get("paraphrase_prompts"), "paraphrase_prompts"),
        locality=tuple(Probe(p, true, "neighborhood") for p in neighborhood),
    )


def _flat_counterfact(record: dict, index: int) -> EditRecord:
    ground_truth = record.get("ground_truth")
    return EditRecord(
        case_id=_case_id(record, "case_id", index),
        prompt=_prompt(_dig(record, "prompt"), "prompt"),
        target=_target(_first_text(_dig(record, "target_new"), "target_new"), "target_new"),
        subject=_opt_text(record.get("subject"), "subject"),
        ground_truth=None if ground_truth is None else _first_text(ground_truth, "ground_truth"),
        rephrases=_texts(record.get("rephrase_prompt"), "rephrase_prompt"),
        locality=_probes(
            record.get("locality_prompt"), record.get("locality_ground_truth"), "neighborhood", ("locality_prompt", "locality_ground_truth")
        ),
    )


def parse_counterfact(record: dict, index: int) -> list[EditRecord]:
    """ROME's counterfact.json (has `requested_rewrite`) or EasyEdit's flat counterfact files (do not)."""
    return [_rome_counterfact(record, index) if "requested_rewrite" in record else _flat_counterfact(record, index)]


def parse_qaedit(record: dict, index: int) -> list[EditRecord]:
    """QAEdit: a QA pair with its own id, rephrase(s) and a list of {loc, loc_ans} probes."""
    locality = record.get("locality") or []
    if isinstance(locality, dict):
        locality = [locality]
    probes = []
    for k, item in enumerate(locality):
        where = f"locality[{k}]."
        prompt = _text(_dig(item, "loc", where), where + "loc")
        probes.append(Probe(prompt, _first_text(_dig(item, "loc_ans", where), where + "loc_ans"), "locality"))
    ground_truth = record.get("ground_truth")
    return [
        EditRecord(
            case_id=_case_id(record, "id", index),
            prompt=_prompt(_dig(record, "prompt"), "prompt"),
            target=_target(_dig(record, "target"), "target"),
            subject=_opt_text(record.get("subject"), "subject"),
            ground_truth=None if ground_truth is None else _first_text(ground_truth, "ground_truth"),
            rephrases=_texts(record.get("rephrase"), "rephrase"),
            locality=tuple(probes),
        )
    ]


def parse_mquake(record: dict, index: int) -> list[EditRecord]:
    """MQuAKE: an edit per requested rewrite; the case's multi-hop questions probe the first one's portability.

    A blank target in any rewrite drops the whole case: its multi-hop questions need every rewrite.
    """
    case_id = _case_id(record, "case_id", index)
    rewrites = _dig(record, "requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise _Invalid("has 'requested_rewrite' that is not a non-empty list of rewrites")
    edits = []
    for j, rewrite in enumerate(rewrites):
        prefix = f"requested_rewrite[{j}]."
        question = _opt(rewrite, "question")
        true = _opt(rewrite, "target_true.str")
        edits.append(
            EditRecord(
                case_id=f"{case_id}.{j}",
                prompt=_rewrite_prompt(rewrite, prefix) if question is None else _prompt(question, prefix + "question"),
                target=_target(_dig(rewrite, "target_new.str", prefix), prefix + "target_new.str"),
                subject=_opt_text(_opt(rewrite, "subject"), prefix + "subject"),
                ground_truth=None if true is None else _text(true, prefix + "target_true.str"),
                portability=_multi_hop(record) if j == 0 else (),
            )
        )
    return edits


def _multi_hop(record: dict) -> tuple[Probe, ...]:
    questions = _texts(record.get("questions"), "questions")
    if not questions:
        return ()
    answer = _first_text(_dig(record, "new_answer"), "new_answer")
    return tuple(Probe(q, answer, "multi_hop") for q in questions)


def _mapped_value(record: dict, name: str, fields: dict[str, str]) -> Any:
    """The record's value for EditRecord field `name`: prompt, target and every explicitly mapped column must exist."""
    column = fields.get(name, name)
    value = record.get(column)
    if value is None and name in fields:
        raise _missing(record, column, f"mapped to {name}", fix="add it or fix `fields:`")
    if value is None and name in ("prompt", "target"):
        raise _missing(record, column, fix=f"add it or map your column with `fields: {{{name}: <column>}}`")
    return None if value == "" and name not in ("prompt", "target") else value


def _json_list_or_text(value: Any) -> Any:
    """CSV cells can hold a JSON list ('["a", "b"]') where a field takes several strings."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def parse_mapped(record: dict, index: int, fields: dict[str, str] | None = None) -> list[EditRecord]:
    """Users' own edits (JSONL/JSON/CSV) whose columns map onto EditRecord's fields through `fields`."""
    fields = fields or {}
    value = partial(_mapped_value, record, fields=fields)
    col = {name: fields.get(name, name) for name in MAPPED_FIELDS}
    case_id = value("case_id")
    ground_truth = value("ground_truth")
    return [
        EditRecord(
            case_id=str(index) if case_id is None else _text(case_id, col["case_id"]),
            prompt=_prompt(value("prompt"), col["prompt"]),
            target=_target(value("target"), col["target"]),
            subject=_opt_text(value("subject"), col["subject"]),
            ground_truth=None if ground_truth is None else _first_text(_json_list_or_text(ground_truth), col["ground_truth"]),
            rephrases=_texts(_json_list_or_text(value("rephrases")), col["rephrases"]),
            locality=_probes(
                _json_list_or_text(value("locality_prompt")),
                _json_list_or_text(value("locality_answer")),
                "locality",
                (col["locality_prompt"], col["locality_answer"]),
            ),
        )
    ]


PARSERS: dict[str, Callable[..., list[EditRecord]]] = {
    "zsre": parse_zsre,
    "knowedit": parse_knowedit,
    "counterfact": parse_counterfact,
    "qaedit": parse_qaedit,
    "mquake": parse_mquake,
    "jsonl": parse_mapped,
    "csv": parse_mapped,
}


def _guess_format(record: Any) -> str | None:
    """Which format a record's keys look like, to point a user at the right `format:` when a key is missing."""
    if not isinstance(record, dict):
        return None
    rewrite = record.get("requested_rewrite")
    if isinstance(rewrite, list):
        return "mquake"
    if isinstance(rewrite, dict) or {"target_new", "locality_prompt"} <= record.keys():
        return "counterfact"
    if {"src", "alt"} <= record.keys():
        return "zsre"
    if "target_new" in record and ("portability" in record or isinstance(record.get("locality"), dict)):
        return "knowedit"
    if "target" in record and isinstance(record.get("locality"), list):
        return "qaedit"
    return None


# ---------------------------------------------------------------------------------------------- reading files


def _read_csv(path: Path, text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return [{k: v for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as exc:
        raise MergeEditError(f"{path}: not valid CSV at line {reader.line_num} ({exc}); fix the quoting there") from None


def read_records(path: Path, format: str) -> list:
    """The raw records: CSV with a header for `csv`; otherwise a JSON array or JSONL, told apart by the first character."""
    text = read_text_file(path, "dataset file")
    if format == "csv":
        return _read_csv(path, text)
    return read_json_array(path, text) if text.lstrip().startswith("[") else read_jsonl(path, text)


# ---------------------------------------------------------------------------------------------- load_edits


def _check_format(path: Path, format: str, fields: dict | None) -> str:
    """The normalised format name, after checking it and the `fields:` mapping (checked before the file is read)."""
    name = str(format).strip().lower()
    if name not in PARSERS:
        raise MergeEditError(f"{path}: unknown dataset format '{format}'{did_you_mean(name, PARSERS)}; formats are: {', '.join(PARSERS)}")
    if not fields:
        return name
    if name not in ("jsonl", "csv"):
        raise MergeEditError(f"{path}: `fields:` only applies to the jsonl and csv formats, not '{name}'; remove it")
    if not isinstance(fields, dict):
        raise MergeEditError(f"{path}: `fields:` must map EditRecord fields to your column names, got {_short(fields)}")
    for key, column in fields.items():
        if key not in MAPPED_FIELDS:
            hint = did_you_mean(key, MAPPED_FIELDS)
            raise MergeEditError(f"{path}: `fields:` has unknown key '{key}'{hint}; keys are: {', '.join(MAPPED_FIELDS)}")
        if not isinstance(column, str) or not column:
            raise MergeEditError(f"{path}: `fields:` maps '{key}' to {_short(column)}; give a column name")
    return name


def _positions(path: Path, count: int, select: list[int] | None, start: int, limit: int | None) -> list[int]:
    """File record indices to read: `select` (in its order) or all, then sliced by start/limit."""
    for name, value in (("start", start), ("limit", limit)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise MergeEditError(f"{path}: {name} must be a whole number >= 0, got {_short(value)}")
    if select is not None and not isinstance(select, (list, tuple)):
        raise MergeEditError(f"{path}: select must be a list of record indices, got {_short(select)}")
    if select is None:
        chosen = list(range(count))
    else:
        chosen = []
        for i in select:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count:
                raise MergeEditError(f"{path}: select has {_short(i)}, but the file's records are numbered 0..{count - 1}; fix `select`")
            chosen.append(i)
        if len(set(chosen)) < len(chosen):
            twice = next(i for i in chosen if chosen.count(i) > 1)
            raise MergeEditError(f"{path}: select lists record {twice} twice; list each record once")
    return chosen[start : None if limit is None else start + limit]


def _record_error(path: Path, index: int, record: Any, exc: _Invalid, format: str) -> MergeEditError:
    fix = exc.fix
    if fix is None:
        guess = _guess_format(record)
        fix = f"fix the record or check that the file is in '{format}' format"
        if guess and guess != format:
            fix = f"this record looks like format '{guess}'"
    return MergeEditError(f"{path}: record {index} {exc.problem}; {fix}")


def load_edits(
    path: str | Path,
    format: str,
    *,
    fields: dict[str, str] | None = None,
    limit: int | None = None,
    start: int = 0,
    select: list[int] | None = None,
    skip_empty_targets: bool = True,
) -> EditList:
    """Edits from a dataset file, in file order.

    select / start / limit pick file records by their 0-based index in the file (the "record N" of errors, and the
    case_id where the file has no id of its own): `select` first, then `[start : start + limit]` of that. Only the
    picked records are parsed, and indices stay put when blank targets are dropped, so `select` is reproducible.
    MQuAKE records give one edit per requested rewrite. Records with a blank target are dropped (their indices in
    `.skipped`) or, with skip_empty_targets=False, reported as errors.
    """
    path = Path(path)
    format = _check_format(path, format, fields)
    parse = partial(parse_mapped, fields=fields) if format in ("jsonl", "csv") else PARSERS[format]
    records = read_records(path, format)
    edits, skipped = EditList(), []
    for index in _positions(path, len(records), select, start, limit):
        record = records[index]
        try:
            if not isinstance(record, dict):
                raise _Invalid(f"is a JSON {json_type(record)}, not an object", fix='each record must be {"key": value, ...}')
            edits.extend(parse(record, index))
        except _EmptyTarget as exc:
            if not skip_empty_targets:
                fix = "give it a target, drop it, or load with skip_empty_targets=True"
                raise MergeEditError(f"{path}: record {index} {exc.problem}; {fix}") from None
            skipped.append(index)
        except _Invalid as exc:
            raise _record_error(path, index, record, exc, format) from None
    if skipped:
        _log.warning("%s: skipped %d record(s) with an empty target: %s", path, len(skipped), ", ".join(map(str, skipped)))
    if not edits:
        reason = f"all {len(skipped)} selected record(s) have an empty target" if skipped else f"the file has {len(records)} record(s)"
        raise MergeEditError(f"{path}: no edits selected ({reason}; select={select}, start={start}, limit={limit}); widen the selection")
    edits.skipped = tuple(skipped)
    return edits
