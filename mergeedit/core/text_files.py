"""Reading the project's text inputs (edit datasets, drift and retain sets): UTF-8 text, JSON arrays and JSONL, each
failure one line naming the file, the line and the fix. Written once here for every reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import MergeEditError


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(value), "number")


def read_text_file(path: Path, what: str = "file") -> str:
    """The file's text (UTF-8; a byte-order mark, as spreadsheet exports write, is dropped)."""
    path = Path(path)
    if not path.exists():
        raise MergeEditError(f"{path}: no such file ({what}); check the path (relative paths start from {Path.cwd()})")
    if path.is_dir():
        raise MergeEditError(f"{path}: is a folder, not a {what}; name the .json/.jsonl/.csv file inside it")
    from .paths import open_regular

    try:
        with open_regular(path, what) as f:  # a FIFO or a device where the file should be is refused, not read forever
            return f.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MergeEditError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); re-save the file as UTF-8") from None
    except OSError as exc:
        raise MergeEditError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None


def read_json_array(path: Path, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MergeEditError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix the file") from None
    if not isinstance(data, list):
        raise MergeEditError(f"{path}: holds a JSON {json_type(data)}, not a list of records; write [record, ...] or one record per line")
    return data


def read_jsonl_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSONL text."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            if lineno == 1 and text.lstrip().startswith("{"):
                read_json_array(path, text)  # one pretty-printed object: say so rather than blame line 1
            raise MergeEditError(
                f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); each line of a JSONL file must hold one record"
            ) from None
    return rows


def read_jsonl(path: Path, text: str) -> list:
    return [row for _, row in read_jsonl_lines(path, text)]
