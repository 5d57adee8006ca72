"""YAML documents that remember where each key came from, so errors can name the file and line."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import MergeEditError
from .paths import read_regular_bytes

KeyPath = tuple[Any, ...]


@dataclass
class YamlDocument:
    path: Path
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def where(self, key_path: Iterable[Any]) -> str:
        """`file:line (a.b[0].c)` for the deepest part of `key_path` we have a line for."""
        key_path = tuple(key_path)
        line = None
        for n in range(len(key_path), -1, -1):
            line = self.lines.get(key_path[:n])
            if line is not None:
                break
        dotted = format_key_path(key_path)
        loc = f"{self.path}:{line}" if line else str(self.path)
        return f"{loc} ({dotted})" if dotted else loc


def format_key_path(key_path: Iterable[Any]) -> str:
    out = ""
    for k in key_path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def _walk(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            _walk(value_node, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines)


MAX_YAML_BYTES = 64 << 20
ALIAS_NODE_BUDGET = 10_000  # nodes reached again through aliases; a config reusing anchors needs a few hundred at most


def _read_text(path: Path, what: str) -> str:
    if not path.exists() and not path.is_symlink():
        raise MergeEditError(f"{path}: {what} file not found; check the path")
    try:
        return read_regular_bytes(path, f"{what} file", MAX_YAML_BYTES).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MergeEditError(f"{path}: cannot read the {what} file ({exc})") from None


def check_alias_budget(root: yaml.Node, path: Path, what: str) -> None:
    """Refuse a document whose aliases expand into more than ALIAS_NODE_BUDGET extra nodes (a "billion laughs" bomb
    expands a few hundred bytes into billions of nodes): counted on the composed graph, stopping at the budget."""
    distinct: set[int] = set()
    stack = [root]
    while stack:  # every node once: linear in the text
        node = stack.pop()
        if id(node) in distinct:
            continue
        distinct.add(id(node))
        stack.extend(_children(node))
    limit = len(distinct) + ALIAS_NODE_BUDGET
    visits = 0
    stack = [root]
    while stack:  # every node as often as aliases repeat it, until the budget runs out
        node = stack.pop()
        visits += 1
        if visits > limit:
            line = root.start_mark.line + 1
            raise MergeEditError(
                f"{path}:{line}: the {what} uses YAML aliases (*name) that expand to more than {ALIAS_NODE_BUDGET:,} extra nodes; "
                "write the repeated parts out or reuse fewer anchors"
            )
        stack.extend(_children(node))


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _compose_all(text: str, path: Path, what: str) -> list:
    """The documents' node graphs, each checked against the alias budget before anything is constructed from it."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise _syntax_error(path, exc) from None
    except RecursionError:
        raise MergeEditError(f"{path}: the {what} is nested too deeply to read; flatten it") from None
    for node in nodes:
        if node is not None:
            check_alias_budget(node, path, what)
    return nodes


def _construct(node: yaml.Node, path: Path, what: str) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _syntax_error(path, exc) from None
    except RecursionError:
        raise MergeEditError(f"{path}: the {what} is nested too deeply to read; flatten it") from None
    finally:
        loader.dispose()


def _syntax_error(path: Path, exc: yaml.YAMLError) -> MergeEditError:
    mark = getattr(exc, "problem_mark", None)
    loc = f"{path}:{mark.line + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return MergeEditError(f"{loc}: invalid YAML: {problem}; fix the syntax at that line")


def load_yaml(path: Path | str, what: str = "config") -> YamlDocument:
    """Parse a YAML file, turning every failure into one clear line."""
    path = Path(path)
    text = _read_text(path, what)
    nodes = _compose_all(text, path, what)
    if len(nodes) > 1:
        raise MergeEditError(f"{path}: the {what} holds {len(nodes)} YAML documents (separated by ---); keep one")
    node = nodes[0] if nodes else None
    data = _construct(node, path, what) if node is not None else None
    if not isinstance(data, dict):
        raise MergeEditError(f"{path}: the {what} must be a YAML mapping of keys to values, got {type(data).__name__}")
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return YamlDocument(path, data, lines)


def count_yaml_documents(path: Path | str) -> int:
    """How many non-empty documents a YAML file holds (0 when it cannot be read or parsed: load_yaml then says why)."""
    try:
        text = read_regular_bytes(Path(path), "config file", MAX_YAML_BYTES).decode("utf-8-sig")
        return sum(node is not None for node in yaml.compose_all(text, Loader=yaml.SafeLoader))
    except (MergeEditError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return 0


def load_yaml_documents(path: Path | str, what: str = "config") -> list[YamlDocument]:
    """Every non-empty document of a multi-document YAML file (`---` separated), each with its own line numbers."""
    path = Path(path)
    text = _read_text(path, what)
    pairs = [(_construct(node, path, what), node) for node in _compose_all(text, path, what) if node is not None]
    docs = []
    for data, node in pairs:
        if not isinstance(data, dict):
            where = f"{path}:{node.start_mark.line + 1}"
            raise MergeEditError(f"{where}: each document of the {what} must be a mapping of keys to values, got {type(data).__name__}")
        lines: dict[KeyPath, int] = {}
        _walk(node, (), lines)
        docs.append(YamlDocument(path, data, lines))
    return docs


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
