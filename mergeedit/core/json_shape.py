"""The one shape check for JSON documents mergeedit reads (config.json, indexes, manifests, journals, adapter and
tokenizer configs): a document is checked against a small declarative shape before any field is used, so a file of
the wrong shape is one line naming the file, the entry and what was expected, never a KeyError deep inside.

A shape is a Python type (`str`, `int`, `float` (an int is accepted too), `bool`, `dict`, `list`, `type(None)`), `ANY`,
or one of `Obj`, `MapOf`, `ListOf`, `OneOf`, `Where` below. Objects allow keys the shape does not mention (config.json
files carry many); the keys a shape names are checked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import MergeEditError
from .paths import read_regular_bytes

ANY = object()
MAX_JSON_BYTES = 512 << 20  # no JSON document mergeedit reads comes near this (tokenizer.json files are ~10-30 MB)


@dataclass(frozen=True)
class Obj:
    """A JSON object: `required` keys must be present, `optional` keys may be; each value has its shape."""

    required: dict[str, Any] = field(default_factory=dict)
    optional: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MapOf:
    """A JSON object used as a mapping: any string keys, every value of shape `value`."""

    value: Any
    min_items: int = 0


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class OneOf:
    options: tuple

    def __init__(self, *options: Any) -> None:
        object.__setattr__(self, "options", options)


@dataclass(frozen=True)
class Where:
    """`shape`, and then `test(value)` must hold; `rule` says what it requires ("a non-negative integer")."""

    shape: Any
    test: Callable[[Any], bool]
    rule: str


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object", list: "an array", type(None): "null"}


def describe(shape: Any) -> str:
    if shape is ANY:
        return "any value"
    if isinstance(shape, type):
        return _NAMES.get(shape, shape.__name__)
    if isinstance(shape, (Obj, MapOf)):
        return "an object"
    if isinstance(shape, ListOf):
        return "an array"
    if isinstance(shape, Where):
        return shape.rule
    if isinstance(shape, OneOf):
        return " or ".join(describe(o) for o in shape.options)
    raise TypeError(f"not a shape: {shape!r}")


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number" if math.isfinite(value) else f"the non-finite number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _entry(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _matches_type(value: Any, shape: type) -> bool:
    if shape is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if shape is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, shape)


def shape_problem(value: Any, shape: Any, path: str = "") -> Optional[str]:
    """Where and how `value` departs from `shape` ("weight_map.x: expected a string, got an integer"), or None."""
    at = path or "the document"
    if shape is ANY:
        return None
    if isinstance(shape, type):
        return None if _matches_type(value, shape) else f"{at}: expected {describe(shape)}, got {json_kind(value)}"
    if isinstance(shape, OneOf):
        problems = [shape_problem(value, o, path) for o in shape.options]
        if any(p is None for p in problems):
            return None
        same_kind = [p for o, p in zip(shape.options, problems) if not isinstance(o, type) and _kind_fits(value, o)]
        return same_kind[0] if same_kind else f"{at}: expected {describe(shape)}, got {json_kind(value)}"
    if isinstance(shape, Where):
        inner = shape_problem(value, shape.shape, path)
        if inner is not None:
            return inner
        try:
            ok = bool(shape.test(value))
        except Exception:  # noqa: BLE001 - a test that cannot judge the value rejects it
            ok = False
        return None if ok else f"{at}: expected {shape.rule}, got {_short(value)}"
    if isinstance(shape, ListOf):
        if not isinstance(value, list):
            return f"{at}: expected an array, got {json_kind(value)}"
        for i, item in enumerate(value):
            problem = shape_problem(item, shape.item, _entry(path, i))
            if problem:
                return problem
        return None
    if isinstance(shape, MapOf):
        if not isinstance(value, dict):
            return f"{at}: expected an object, got {json_kind(value)}"
        if len(value) < shape.min_items:
            return f"{at}: expected at least {shape.min_items} entr{'y' if shape.min_items == 1 else 'ies'}, got {len(value)}"
        for key, item in value.items():
            problem = shape_problem(item, shape.value, _entry(path, key))
            if problem:
                return problem
        return None
    if isinstance(shape, Obj):
        if not isinstance(value, dict):
            return f"{at}: expected an object, got {json_kind(value)}"
        for key in shape.required:
            if key not in value:
                return f"{_entry(path, key)}: required key is missing"
        for key, sub in {**shape.required, **shape.optional}.items():
            if key in value:
                problem = shape_problem(value[key], sub, _entry(path, key))
                if problem:
                    return problem
        return None
    raise TypeError(f"not a shape: {shape!r}")


def _kind_fits(value: Any, shape: Any) -> bool:
    """Whether `value` is at least the right kind of container for `shape` (to report the inner problem of a union)."""
    if isinstance(shape, (Obj, MapOf)):
        return isinstance(value, dict)
    if isinstance(shape, ListOf):
        return isinstance(value, list)
    if isinstance(shape, Where):
        return shape_problem(value, shape.shape) is None or _kind_fits(value, shape.shape)
    return False


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool)) or value is None else json_kind(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_shape(value: Any, shape: Any, *, source: Path | str, what: str, fix: str) -> Any:
    """`value` when it has `shape`, else one line: the file, the entry, what was expected, and the fix."""
    problem = shape_problem(value, shape)
    if problem is not None:
        raise MergeEditError(f"{source}: not a valid {what}: {problem}; {fix}")
    return value


def parse_json(raw: bytes | str, *, source: Path | str, what: str, fix: str) -> Any:
    try:
        text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
        return json.loads(text)
    except UnicodeDecodeError:
        raise MergeEditError(f"{source}: not a valid {what}: the file is not UTF-8 text; {fix}") from None
    except RecursionError:
        raise MergeEditError(f"{source}: not a valid {what}: nested too deeply to parse; {fix}") from None
    except ValueError as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise MergeEditError(f"{source}: not a valid {what}: not JSON ({msg}{where}); {fix}") from None


def read_json(path: Path, shape: Any, *, what: str, fix: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file (a regular file, at most `limit` bytes), parse it and check its shape; one line on any failure."""
    raw = read_regular_bytes(Path(path), what, limit)
    return check_shape(parse_json(raw, source=path, what=what, fix=fix), shape, source=path, what=what, fix=fix)


# -- shapes of the documents mergeedit reads ----------------------------------------------------------------------------
POSITIVE_INT = Where(int, lambda v: v > 0, "a positive integer")
NON_NEGATIVE_INT = Where(int, lambda v: v >= 0, "a non-negative integer")
SHA256 = Where(str, lambda v: len(v) == 64 and all(c in "0123456789abcdef" for c in v), "a sha256 hex digest (64 lowercase hex digits)")
OPTIONAL_INT = OneOf(int, type(None))

MODEL_CONFIG = Obj(optional={
    "architectures": OneOf(ListOf(str), type(None)),
    "model_type": OneOf(str, type(None)),
    "num_hidden_layers": OneOf(NON_NEGATIVE_INT, type(None)),
    "n_layer": OneOf(NON_NEGATIVE_INT, type(None)),
    "num_layers": OneOf(NON_NEGATIVE_INT, type(None)),
    "hidden_size": OneOf(POSITIVE_INT, type(None)),
    "vocab_size": OneOf(NON_NEGATIVE_INT, type(None)),
    "tie_word_embeddings": OneOf(bool, type(None)),
    "torch_dtype": OneOf(str, type(None)),
    "dtype": OneOf(str, type(None)),
    "text_config": OneOf(dict, type(None)),
})
SAFETENSORS_INDEX = Obj(required={"weight_map": MapOf(str)}, optional={"metadata": OneOf(dict, type(None))})
MANIFEST = Obj(required={"files": MapOf(Obj(required={"sha256": SHA256, "bytes": NON_NEGATIVE_INT}), min_items=1)})
JOURNAL = Obj(required={"fingerprint": str, "shards": MapOf(SHA256)})
ADAPTER_CONFIG = Obj(optional={
    "peft_type": OneOf(str, type(None)),
    "r": OneOf(int, float),
    "lora_alpha": OneOf(int, float),
    "use_dora": OneOf(bool, type(None)),
    "use_rslora": OneOf(bool, type(None)),
    "fan_in_fan_out": OneOf(bool, type(None)),
    "modules_to_save": OneOf(ListOf(str), type(None)),
    "alpha_pattern": OneOf(dict, type(None)),
    "rank_pattern": OneOf(dict, type(None)),
    "base_model_name_or_path": OneOf(str, type(None)),
})
TOKENIZER_CONFIG = Obj(optional={
    "chat_template": OneOf(str, ListOf(Obj(required={"name": str, "template": str})), type(None)),
    "added_tokens_decoder": OneOf(MapOf(dict), type(None)),
    "model_max_length": OneOf(int, float, type(None)),
})
TOKENIZER_JSON = Obj(required={"model": dict}, optional={"added_tokens": OneOf(ListOf(Obj(required={"id": int, "content": str})), type(None))})
