"""Property tests: random and mutated inputs to the header parser and the config/recipe loaders never crash with
anything but our one-line MergeEditError (derandomized, so CI runs the same examples every time)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergeedit.core import json_shape as shapes
from mergeedit.core.errors import MergeEditError
from mergeedit.core.paths import containment_problem
from mergeedit.io.safetensors_header import parse_header_bytes, read_header
from mergeedit.merging.config import load_merge_config
from mergeedit.pipeline.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))  # CI machines are slow and shared

VALID_HEADER = {
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
}


def _file_bytes(header: dict, data_len: int = 32) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data_len)


def _check_header(tmp: Path, content: bytes) -> None:
    path = tmp / "x.safetensors"
    path.write_bytes(content)
    try:
        tensors, _ = read_header(path)
    except MergeEditError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message
        return
    # Accepted: then every promise the index makes must hold.
    size = len(content)
    spans = sorted((t.start, t.end) for t in tensors.values())
    for t in tensors.values():
        assert 8 <= t.start <= t.end <= size
        assert t.end - t.start == t.numel * t.torch_dtype.itemsize
    for (_s0, e0), (s1, _e1) in zip(spans, spans[1:]):
        assert s1 >= e0


@SETTINGS
@given(content=st.binary(max_size=300))
def test_random_bytes_never_crash_the_header_parser(tmp_path, content):
    _check_header(tmp_path, content)


@SETTINGS
@given(
    data=st.data(),
    edits=st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=400)),
)
def test_mutated_headers_never_crash_the_header_parser(tmp_path, data, edits, cut):
    content = bytearray(_file_bytes(VALID_HEADER))
    for pos, value in edits:
        content[pos % len(content)] = value
    if cut is not None:
        content = content[:cut]
    _check_header(tmp_path, bytes(content))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(
    entries=st.dictionaries(
        st.text(min_size=1, max_size=6),
        st.fixed_dictionaries(
            {},
            optional={
                "dtype": st.sampled_from(["F32", "BF16", "F16", "I8", "BOOL", "F8_E4M3", "Q4", "f32"]) | json_values,
                "shape": st.lists(st.integers(min_value=-2, max_value=9), max_size=3) | json_values,
                "data_offsets": st.lists(st.integers(min_value=-5, max_value=80), min_size=0, max_size=3) | json_values,
            },
        )
        | json_values,
        max_size=4,
    ),
    data_len=st.integers(min_value=0, max_value=80),
)
def test_structured_random_headers_are_accepted_only_when_consistent(tmp_path, entries, data_len):
    _check_header(tmp_path, _file_bytes(entries, data_len))


def test_deeply_nested_header_json_is_a_clear_error(tmp_path):
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(MergeEditError, match="not JSON"):
        parse_header_bytes(tmp_path / "deep.safetensors", raw, len(raw) + 8)


def _load_any(loader, tmp: Path, text: str, name: str) -> None:
    path = tmp / name
    path.write_text(text)
    try:
        loader(path)
    except MergeEditError as exc:
        message = str(exc)
        assert "\n" not in message.strip() and str(path) in message


def _mutations():
    """Line-level edits of a real recipe: drop, duplicate, re-indent, or replace a value."""
    return st.lists(
        st.tuples(st.sampled_from(["drop", "dup", "indent", "dedent", "value", "key"]), st.integers(min_value=0, max_value=200), st.text(max_size=6)),
        min_size=1,
        max_size=4,
    )


def _mutate(text: str, edits) -> str:
    lines = text.splitlines()
    for op, where, word in edits:
        if not lines:
            break
        i = where % len(lines)
        line = lines[i]
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, line)
        elif op == "indent":
            lines[i] = "  " + line
        elif op == "dedent":
            lines[i] = line[2:] if line.startswith("  ") else line
        elif op == "value" and ":" in line:
            lines[i] = line.split(":", 1)[0] + ": " + json.dumps(word)
        elif op == "key" and ":" in line:
            lines[i] = line.replace(line.strip().split(":", 1)[0], word.replace(":", "") or "k", 1)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("recipe", ["demo.yaml", "zsre-sequential.yaml", "zsre-anchored.yaml"])
@SETTINGS
@given(edits=_mutations())
def test_mutated_recipes_never_crash_the_loader(tmp_path, recipe, edits):
    _load_any(load_recipe, tmp_path, _mutate((RECIPES / recipe).read_text(), edits), recipe)


@SETTINGS
@given(doc=st.dictionaries(st.sampled_from(["model", "dataset", "rsft", "merge", "eval", "output", "sequential", "seed", "x"]), json_values, max_size=6))
def test_random_recipe_documents_never_crash_the_loader(tmp_path, doc):
    _load_any(load_recipe, tmp_path, yaml.safe_dump(doc), "random.yaml")


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_text_never_crashes_the_loaders(tmp_path, text):
    _load_any(load_recipe, tmp_path, text, "recipe.yaml")
    _load_any(load_merge_config, tmp_path, text, "merge.yaml")


MERGE_CONFIG = """\
merge_method: ties
base_model: base
parameters:
  normalize: true
models:
  - model: a
    parameters:
      weight: [0.2, 0.8]
      density:
        - filter: mlp
          value: 0.5
        - value: 0.7
slices: null
dtype: float32
"""


@SETTINGS
@given(edits=_mutations())
def test_mutated_merge_configs_never_crash_the_loader(tmp_path, edits):
    _load_any(load_merge_config, tmp_path, _mutate(MERGE_CONFIG, edits), "merge.yaml")


# --------------------------------------------------------------- issue 15: JSON shape checks and path containment

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["weight_map", "files", "model", "x", "sha256", "bytes", "num_hidden_layers", "architectures"]) | st.text(max_size=4), c, max_size=4),
    max_leaves=12,
)
DOCUMENT_SHAPES = {
    "config.json": shapes.MODEL_CONFIG, "index": shapes.SAFETENSORS_INDEX, "manifest": shapes.MANIFEST, "journal": shapes.JOURNAL,
    "adapter_config.json": shapes.ADAPTER_CONFIG, "tokenizer_config.json": shapes.TOKENIZER_CONFIG, "tokenizer.json": shapes.TOKENIZER_JSON,
}


@pytest.mark.parametrize("name", sorted(DOCUMENT_SHAPES))
@SETTINGS
@given(value=JSON_VALUES)
def test_every_document_shape_check_is_one_line_or_a_document_of_that_shape(tmp_path, name, value):
    """Any JSON value read as one of mergeedit's documents is either refused with one line naming the file, or has the
    promised shape (here: an object whose mapping fields hold what the code then indexes)."""
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(value))
    try:
        doc = shapes.read_json(path, DOCUMENT_SHAPES[name], what=name, fix="fix it")
    except MergeEditError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert isinstance(doc, dict)
    if name == "index":
        assert isinstance(doc["weight_map"], dict) and all(isinstance(v, str) for v in doc["weight_map"].values())
    if name == "manifest":
        assert doc["files"] and all(isinstance(e, dict) and isinstance(e["bytes"], int) and e["bytes"] >= 0 for e in doc["files"].values())
    if name == "journal":
        assert isinstance(doc["fingerprint"], str) and isinstance(doc["shards"], dict)


@pytest.fixture(scope="module")
def linked_folder(tmp_path_factory):
    """A folder with a file, a subfolder, a symlink inside, a symlink out, a relative link that climbs out, and a loop."""
    root = tmp_path_factory.mktemp("contain")
    folder, outside = root / "model", root / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    (folder / "a").write_text("a")
    (outside / "secret").write_text("s")
    (folder / "in").symlink_to("a")
    (folder / "out").symlink_to(outside / "secret")
    (folder / "sub" / "up").symlink_to("../../outside/secret")
    (folder / "loop").symlink_to("loop")
    return folder


@SETTINGS
@given(parts=st.lists(st.sampled_from(["a", "in", "out", "sub", "up", "loop", "..", ".", "", "/", "x"]), min_size=1, max_size=4))
def test_a_contained_entry_resolves_inside_its_folder_through_any_symlink(linked_folder, parts):
    entry = "/".join(parts)
    if containment_problem(entry, linked_folder) is None:
        assert (linked_folder / entry).resolve().is_relative_to(linked_folder.resolve())
        assert ".." not in Path(entry).parts and not entry.startswith("/")
