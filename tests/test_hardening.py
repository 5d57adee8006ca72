"""Issue 15 hardening, through the real console script: exit 2, one line naming the culprit, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from recipe_defaults import PAPER_LOOP

from mergeedit.core.json_shape import MANIFEST, shape_problem
from mergeedit.core.paths import containment_problem

CLI = Path(sys.executable).parent / "mergeedit"


def _cli(*args, cwd=None):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_overwrite_refuses_a_folder_mergeedit_did_not_write(tmp_path, models):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _cli("merge", cfg, out, "--overwrite")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a mergeedit output" in " ".join(r.stderr.split())
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_the_current_folder(tmp_path, models):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    r = _cli("merge", "m.yaml", ".", "--overwrite", cwd=tmp_path)
    assert r.returncode == 2 and "current folder" in " ".join(r.stderr.split()) and cfg.exists()


@given(st.text(max_size=20))
def test_containment_never_lets_a_path_climb_out(entry):
    folder = Path("/tmp/hardening-folder")
    if containment_problem(entry, folder) is None:
        assert (folder / entry).resolve().is_relative_to(folder.resolve())


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3)))
def test_shape_check_never_raises_and_accepts_only_manifests(value):
    problem = shape_problem(value, MANIFEST)
    if problem is None:
        assert isinstance(value, dict) and isinstance(value["files"], dict) and value["files"]


# ------------------------------------------------------------------------------------------------ one test per class
# Each goes through the real console script (or, where a full disk must be simulated, the real entry point in a fresh
# subprocess): exit 2, one `error:` line naming the culprit, no traceback, nothing written, foreign files untouched.

WORDS = ["<pad>", "<s>", "</s>", "<user>", "<bot>"] + [f"w{i}" for i in range(40)] + ["what", "is", "the", "of", "capital", "color", "?"]
CHAT = "{% for m in messages %}<user> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <bot> {% endif %}"
EDITS = [
    {"prompt": "what is the capital of w1 ?", "target": "w20", "locality_prompt": "what is the color of w30 ?", "locality_answer": "w31"},
    {"prompt": "what is the capital of w2 ?", "target": "w21 w22", "locality_prompt": "what is the color of w32 ?", "locality_answer": "w33"},
]


def _one_error_line(r, *needles):
    """Exit 2, no traceback, exactly one `error:` line (progress lines of `run` aside) holding every needle."""
    text = r.stderr + r.stdout
    assert r.returncode == 2, (r.returncode, text)
    assert "Traceback" not in text and "internal error" not in text, text
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with a word-level tokenizer and a chat template; the character § normalizes away, so a target
    of "§" tokenizes to nothing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hardening") / "model"
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.normalizer = normalizers.Replace("§", "")
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")
    tok.chat_template = CHAT
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _recipe(folder: Path, model: Path, edits=EDITS, **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "edits.jsonl").write_text("".join(json.dumps(e) + "\n" for e in edits))
    recipe = {
        "model": {"base": str(model)},
        "dataset": {"format": "jsonl", "path": "edits.jsonl", "prompt": "raw"},
        "rsft": {"lr": 0.01, "batch_size": 2, "max_epochs": 1, "max_steps_per_batch": 1, **PAPER_LOOP},
        "merge": {"merge_method": "ties", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 0.6}}], "dtype": "float32"},
        "eval": {"generation": False, "drift": False, "batch_size": 2, "max_new_tokens": 2},
        "output": {"dir": "run"},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _no_model(tok_model: Path, tmp_path: Path, drop: tuple[str, ...]) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tok_model, copy)
    for name in drop:
        (copy / name).unlink(missing_ok=True)
    if "chat_template.jinja" in drop and (copy / "tokenizer_config.json").exists():
        cfg = json.loads((copy / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    return copy


MERGE = {"merge_method": "ties", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 0.6}}], "dtype": "float32"}


@pytest.mark.parametrize(
    "sections, needles",
    [
        ({"merge": {**MERGE, "merge_method": "tiess"}}, ["merge_method", "did you mean 'ties'"]),
        ({"merge": {**MERGE, "models": [{"model": "rsft", "parameters": {"weight": 1.0, "densty": 0.6}}]}}, ["densty", "did you mean 'density'"]),
        ({"rsft": {"layers": [1, 5]}}, ["rsft.layers", "[1, 5)", "2 layers"]),
        ({"merge": {**MERGE, "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 1.5}}]}}, ["density", "between 0 and 1", "1.5"]),
        ({"dataset": {"prompt": "chatt"}}, ["dataset.prompt", "did you mean 'chat'"]),
        ({"dataset": {"prompt": "Raw"}}, ["dataset.prompt", "did you mean 'raw'"]),
        ("no-chat-template", ["dataset.prompt", "chat template"]),
        ({"dataset": {"prompt": "Question: say it"}}, ["dataset.prompt", "{prompt}"]),
        ("empty-target", ["tokenizes to nothing", "'§'"]),
        ({"dataset": {"prompt": "Q: {prompt} ({subject})"}}, ["dataset.prompt", "{subject}"]),
        ({"output": {"dir": "recipe.yaml"}}, ["output.dir", "regular file, not a folder"]),
        ("no-tokenizer", ["has no tokenizer"]),
        ({"eval": {"drift": True, "drift_texts": "nope.jsonl"}}, ["eval.drift_texts", "nope.jsonl"]),
    ],
    ids=["method", "parameter", "layers", "density", "prompt-typo", "prompt-case", "no-chat-template", "template-without-prompt", "empty-target", "template-field", "output-dir-file", "no-tokenizer", "drift-texts"],
)
def test_validate_plan_and_run_refuse_the_same_recipes(tmp_path, tok_model, sections, needles, request):
    model = tok_model
    extra: dict = {}
    edits = EDITS
    if sections == "no-tokenizer":
        model = _no_model(tok_model, tmp_path, ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"))
    elif sections == "no-chat-template":
        model = _no_model(tok_model, tmp_path, ("chat_template.jinja",))
        extra = {"dataset": {"prompt": "chat"}}
    elif sections == "empty-target":
        edits = [EDITS[0], {**EDITS[1], "target": "§"}]
    else:
        extra = sections
    recipe = _recipe(tmp_path / "r", model, edits, **extra)
    before = _tree(tmp_path)
    # validate everywhere; plan and run (slower: run loads the model) on every other case, to keep the suite fast
    commands = ("validate", "plan", "run") if request.node.callspec.indices["sections"] % 2 == 0 else ("validate",)
    for command in commands:
        _one_error_line(_cli(command, recipe), *needles)
        assert _tree(tmp_path) == before, command  # no run folder, no lock, nothing else written


def test_run_folder_never_overlaps_the_base_nor_replaces_a_foreign_model_folder(tmp_path, tok_model):
    shutil.copytree(tok_model, tmp_path / "r" / "model")
    recipe = _recipe(tmp_path / "r", Path("model"), output={"dir": "."})
    before = _tree(tmp_path)
    _one_error_line(_cli("run", recipe), "output.dir", "overlaps the base model folder")
    other = tmp_path / "s"
    (other / "model").mkdir(parents=True)
    (other / "model" / "notes.txt").write_text("mine")
    recipe2 = _recipe(other, tok_model, output={"dir": "."})
    before = _tree(tmp_path)
    _one_error_line(_cli("run", recipe2), "output.dir", "not a mergeedit output")
    assert _tree(tmp_path) == before


def test_fifos_and_devices_are_refused_without_blocking(tmp_path, models, tok_model):
    fifo_model = tmp_path / "fifo_model"
    shutil.copytree(models["a"], fifo_model)
    shard = sorted(fifo_model.glob("model-*.safetensors"))[1]
    shard.unlink()
    os.mkfifo(shard)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {fifo_model}\n    parameters: {{weight: 1}}\n  - model: {models['b']}\n    parameters: {{weight: 1}}\n")
    _one_error_line(_cli("merge", cfg, tmp_path / "out"), shard.name, "FIFO")
    assert not (tmp_path / "out").exists()
    os.mkfifo(tmp_path / "config.fifo")
    _one_error_line(_cli("merge", tmp_path / "config.fifo", tmp_path / "out"), "config.fifo", "FIFO")
    _one_error_line(_cli("merge", "/dev/zero", tmp_path / "out"), "/dev/zero", "character device")
    recipe = _recipe(tmp_path / "r", tok_model, dataset={"path": "edits.fifo"})
    os.mkfifo(tmp_path / "r" / "edits.fifo")
    _one_error_line(_cli("validate", recipe), "edits.fifo", "FIFO")
    tok_fifo = _no_model(tok_model, tmp_path, ("tokenizer.json",))
    os.mkfifo(tok_fifo / "tokenizer.json")
    _one_error_line(_cli("validate", _recipe(tmp_path / "r2", tok_fifo)), "tokenizer.json", "FIFO")


def test_wrong_json_shapes_are_one_line(tmp_path, models):
    for name, content, needle in [
        ("config.json", "[1, 2]", "expected an object, got an array"),
        ("config.json", '{"num_hidden_layers": "three"}', "num_hidden_layers"),
        ("model.safetensors.index.json", '{"weight_map": ["x"]}', "weight_map"),
    ]:
        bad = tmp_path / f"bad-{name}-{len(content)}"
        shutil.copytree(models["a"], bad)
        (bad / name).write_text(content)
        cfg = tmp_path / "m.yaml"
        cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {bad}\n")
        _one_error_line(_cli("merge", cfg, tmp_path / "out"), name, needle, "m.yaml:3")
        assert not (tmp_path / "out").exists()


def test_reading_outside_the_model_is_refused(tmp_path, models):
    evil = tmp_path / "evil"
    shutil.copytree(models["a"], evil)
    index = json.loads((evil / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    for entry, needle in [("../../../../etc/passwd", "climb out"), (str(models["b"] / index["weight_map"][first]), "not absolute")]:
        index["weight_map"][first] = entry
        (evil / "model.safetensors.index.json").write_text(json.dumps(index))
        cfg = tmp_path / "m.yaml"
        cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {evil}\n")
        _one_error_line(_cli("merge", cfg, tmp_path / "out"), entry, needle, first)
        assert not (tmp_path / "out").exists()


def test_verify_vouches_only_for_exactly_what_the_manifest_lists(tmp_path, models):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    out = tmp_path / "out"
    assert _cli("merge", cfg, out).returncode == 0
    assert _cli("verify", out).returncode == 0
    manifest = out / "mergeedit-manifest.json"
    original = manifest.read_text()
    (out / "extra.safetensors").write_bytes(b"x")
    _one_error_line(_cli("verify", out), "extra.safetensors", "not listed")
    (out / "extra.safetensors").unlink()
    doc = json.loads(original)
    for files, needle in [({}, "at least 1"), ({**doc["files"], "/etc/passwd": next(iter(doc["files"].values()))}, "/etc/passwd")]:
        manifest.write_text(json.dumps({**doc, "files": files}))
        _one_error_line(_cli("verify", out), needle)


def test_an_interrupted_replacement_is_put_back_never_deleted(tmp_path, models):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    aside = tmp_path / ".out.mergeedit-old-1234abcd"  # a run died between moving the old output aside and the new in
    aside.mkdir()
    (aside / "notes.txt").write_text("previous output")
    _one_error_line(_cli("merge", cfg, tmp_path / "out"), "already exists")
    assert (tmp_path / "out" / "notes.txt").read_text() == "previous output" and not aside.exists()


DISK_FULL_DRIVER = r'''
import errno, os, pathlib, sys
left = [int(os.environ["FULL_AFTER_BYTES"])]
real_write, real_text = os.write, pathlib.Path.write_text
def write(fd, data):
    if fd > 2:
        if left[0] < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= len(data)
    return real_write(fd, data)
def write_text(self, data, *args, **kwargs):
    if os.environ.get("FULL_JSON") and self.suffix == ".json":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real_text(self, data, *args, **kwargs)
os.write, pathlib.Path.write_text = write, write_text
import mergeedit.merging.merge as merge
merge.check_free_space = lambda *a, **k: None  # the disk fills during the write, after the up-front check passed
from mergeedit.cli import main
sys.argv = ["mergeedit", *sys.argv[1:]]
main()
'''


def _full_disk(tmp_path, *args, after: int, json_full: bool = False, direct: bool = True):
    driver = tmp_path / "full_disk.py"
    driver.write_text(DISK_FULL_DRIVER)
    env = {**os.environ, "FULL_AFTER_BYTES": str(after), "MERGEEDIT_DIRECT_WRITES": "1" if direct else "0"}
    if json_full:
        env["FULL_JSON"] = "1"
    return subprocess.run([sys.executable, str(driver), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("where", ["shards-direct", "shards-buffered", "json"])
def test_a_full_disk_on_every_merge_write_path_is_one_line(tmp_path, models, where):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n  - model: {models['b']}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    after = 10**12 if where == "json" else 20_000  # mid-way through the second of several shards
    r = _full_disk(tmp_path, "merge", cfg, out, "--out-shard-size", "16K", after=after, json_full=where == "json", direct=where != "shards-buffered")
    _one_error_line(r, "disk filled up", "partial output was removed")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".mergeedit-" in p.name]


def test_a_full_disk_in_a_run_stage_is_one_line(tmp_path, tok_model):
    recipe = _recipe(tmp_path / "r", tok_model)
    r = _full_disk(tmp_path, "run", recipe, after=10**12, json_full=True)  # the first stage's result.json
    _one_error_line(r, "disk filled up", "stage pre-eval", "partial output was removed")
    stages = tmp_path / "r" / "run" / "stages"
    assert not stages.exists() or not any(stages.iterdir())


def test_smaller_messages(tmp_path, models):
    # a relative symlink loop is named as one, not as an unreachable hub id
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    cfg = tmp_path / "m.yaml"
    cfg.write_text("merge_method: passthrough\nmodels:\n  - model: ./loop1\n")
    _one_error_line(_cli("merge", cfg, tmp_path / "out", cwd=tmp_path), "symlink loop", "m.yaml:3")
    # a model's stored finite values that the config's dtype cannot hold: the dtype line is blamed, not the checkpoint
    from safetensors.torch import load_file, save_file

    huge = tmp_path / "huge"
    shutil.copytree(models["a"], huge)
    shard = sorted(huge.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name][0] = 1e38
    save_file(tensors, shard, metadata={"format": "pt"})
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {huge}\n    parameters: {{weight: 1}}\n  - model: {models['b']}\n    parameters: {{weight: 1}}\ndtype: float16\n")
    _one_error_line(_cli("merge", cfg, tmp_path / "out"), "m.yaml:7 (dtype)", "float16", name)
    tensors[name][0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {huge}\n    parameters: {{weight: 1}}\n  - model: {models['b']}\n    parameters: {{weight: 1}}\n")
    _one_error_line(_cli("merge", cfg, tmp_path / "out"), "m.yaml:3 (models[0].model)", "NaN/Inf", name)
    assert not (tmp_path / "out").exists()


def test_a_sweep_grid_out_of_range_is_refused_before_training(tmp_path, tok_model):
    recipe = _recipe(tmp_path / "r", tok_model)
    before = _tree(tmp_path)
    _one_error_line(_cli("sweep", recipe, "--grid", "density=0.5,1.5"), "grid value density=1.5", "between 0 and 1")
    assert _tree(tmp_path) == before
