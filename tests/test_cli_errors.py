"""Bad input: one line naming the file, key or tensor and the fix; exit status 2; no traceback; nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import write_config
from safetensors.torch import load_file, save_file


def _assert_clean_failure(result, out: Path, *needles: str) -> None:
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    message = " ".join(result.stderr.split())  # rich may wrap; the message itself is one line
    assert message.startswith("error:"), message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".mergeedit-tmp-" in p.name]


def _copy_model(src: Path, dst: Path, edit) -> Path:
    """A copy of a model folder with its tensors changed by `edit(name, tensor) -> tensor | None`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = {k: v for k, v in ((k, edit(k, v)) for k, v in load_file(f).items()) if v is not None}
            save_file(tensors, dst / f.name)
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    index = dst / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if edit(k, torch.zeros(1)) is not None}
        index.write_text(json.dumps(data))
    return dst


CASES = {
    "yaml_syntax": ("merge_method: linear\nmodels: [\n", ["merge.yaml:", "invalid YAML"]),
    "not_a_mapping": ("- just\n- a list\n", ["merge.yaml", "mapping"]),
    "unknown_top_key": ("merge_methd: linear\nmodels:\n  - model: {a}\n", ["merge.yaml:1", "merge_methd", "did you mean 'merge_method'"]),
    "unknown_method": ("merge_method: tiez\nbase_model: {base}\nmodels:\n  - model: {a}\n", ["merge.yaml:1", "tiez", "did you mean 'ties'"]),
    "slerp_three_models": ("merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nmodels:\n  - model: {a}\n  - model: {b}\n", ["slerp", "at most 2 input"]),
    "slerp_without_t": ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\n", ["needs parameter 't'"]),
    "missing_model": ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: /nonexistent/model\n    parameters: {{weight: 1}}\n", ["merge.yaml:5", "models[1].model", "/nonexistent/model", "no such file"]),
    "missing_weight": ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{density: 0.5}}\n", ["needs parameter 'weight'", "model '{a}'"]),
    "unknown_parameter": ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, densty: 0.5}}\n", ["merge.yaml:5", "densty", "did you mean 'density'"]),
    "wrong_type": ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: lots}}\n", ["weight", "expected a float"]),
    "no_base_for_ties": ("merge_method: ties\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n", ["needs a base model", "base_model"]),
    "two_layouts": ("merge_method: linear\nmodels:\n  - model: {a}\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 1]}}]\n", ["exactly one of 'models', 'slices'"]),
    "passthrough_two_inputs": ("merge_method: passthrough\nmodels:\n  - model: {a}\n  - model: {b}\n", ["at most 1 input"]),
    "slice_lengths_differ": ("merge_method: linear\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n      - {{model: {b}, layer_range: [0, 3]}}\n", ["same number of layers", "slices[0].sources"]),
    "layer_range_too_far": ("merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 9]}}]\n", ["exceeds the 3 layers"]),
    "zero_weights": ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0}}\n  - model: {b}\n    parameters: {{weight: 0}}\n", ["weights sum to zero"]),
    "bad_dtype": ("merge_method: linear\ndtype: float13\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n", ["merge.yaml:2", "float13"]),
    "union_tokenizer": ("merge_method: linear\ntokenizer_source: union\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n", ["merge.yaml:2", "cannot load the tokenizer of"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_configs(case, tmp_path, models, run_cli):
    text, needles = CASES[case]
    fmt = {k: str(v) for k, v in models.items()}
    cfg = write_config(tmp_path, text.format(**fmt))
    out = tmp_path / "out"
    result = run_cli("merge", cfg, out)
    _assert_clean_failure(result, out, *[n.format(**fmt) for n in needles])


def test_missing_config_file(tmp_path, run_cli):
    out = tmp_path / "out"
    _assert_clean_failure(run_cli("merge", tmp_path / "nope.yaml", out), out, "nope.yaml", "not found")


def test_tensor_missing_from_one_model(tmp_path, models, run_cli):
    holed = _copy_model(models["b"], tmp_path / "holed", lambda k, v: None if k == "model.layers.1.mlp.up_proj.weight" else v)
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n  - model: {holed}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    _assert_clean_failure(run_cli("merge", cfg, out), out, "merge.yaml:5", "has no tensor 'model.layers.1.mlp.up_proj.weight'", str(holed))


def test_shape_mismatch(tmp_path, models, run_cli):
    wide = _copy_model(models["b"], tmp_path / "wide", lambda k, v: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == "model.norm.weight" else v)
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n  - model: {wide}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    _assert_clean_failure(run_cli("merge", cfg, out), out, "model.norm.weight", "different shapes", "[33]")


def test_dtype_mismatch_asks_for_a_dtype(tmp_path, models, run_cli):
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n  - model: {models['bf16']}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    _assert_clean_failure(run_cli("merge", cfg, out), out, "different dtypes", "float32", "bfloat16", "dtype: float32")


def test_corrupt_shard_is_named(tmp_path, models, run_cli):
    broken = _copy_model(models["b"], tmp_path / "broken", lambda k, v: v)
    shard = broken / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n  - model: {broken}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    _assert_clean_failure(run_cli("merge", cfg, out), out, str(shard), "does not fit")


def test_output_inside_an_input_folder(tmp_path, models, run_cli):
    cfg = write_config(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    out = models["a"] / "merged"
    _assert_clean_failure(run_cli("merge", cfg, out), out, "overlaps the input model folder")


def test_bad_cli_values(tmp_path, models, run_cli):
    cfg = write_config(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    out = tmp_path / "out"
    _assert_clean_failure(run_cli("merge", cfg, out, "--out-shard-size", "huge"), out, "--out-shard-size", "huge")
    _assert_clean_failure(run_cli("merge", cfg, out, "--dtype", "int4"), out, "--dtype", "int4")


def test_dry_run_and_inspect_read_no_tensor_data(tmp_path, models, run_cli, monkeypatch):
    from mergeedit.io import tensor_reader

    def forbidden(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(tensor_reader.TensorReader, "read", forbidden)
    cfg = write_config(tmp_path, f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1, density: 0.5}}\n")
    result = run_cli("merge", cfg, tmp_path / "out", "--dry-run")
    assert result.code == 0 and "model.layers.2.mlp.down_proj.weight" in result.stdout and "read " in result.stdout
    assert not (tmp_path / "out").exists()
    result = run_cli("inspect", models["a"])
    assert result.code == 0
    for needle in ("LlamaForCausalLM", "layers", "3", "F32 x", "model-00001-of-00003.safetensors"):
        assert needle in result.stdout


def test_manifest_and_verify_name_the_first_bad_file(tmp_path, models, run_cli):
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n  - model: {models['b']}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    assert run_cli("merge", cfg, out, "--out-shard-size", "60K").code == 0
    ok = run_cli("verify", out)
    assert ok.code == 0 and "match the manifest" in ok.stdout
    manifest = json.loads((out / "mergeedit-manifest.json").read_text())["files"]
    import hashlib

    for name, entry in manifest.items():  # digests computed while streaming equal a fresh hash of the file
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    shard = out / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run_cli("verify", out)
    assert bad.code == 2 and "model-00002-of-00003.safetensors" in bad.stderr and "sha256" in bad.stderr


def test_concurrent_run_on_the_same_output_refuses(tmp_path, models, run_cli):
    from mergeedit.io.integrity import OutputLock

    cfg = write_config(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    out = tmp_path / "out"
    with OutputLock(out):
        _assert_clean_failure(run_cli("merge", cfg, out), out, "another mergeedit run", "is writing this folder")
    assert run_cli("merge", cfg, out).code == 0  # released: the next run goes through


def test_disk_space_is_checked_first_and_a_full_disk_cleans_up(tmp_path, models, run_cli, monkeypatch):
    import errno
    import shutil as sh
    from collections import namedtuple

    cfg = write_config(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    out = tmp_path / "out"
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(sh, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
        _assert_clean_failure(run_cli("merge", cfg, out), out, "needs", "free")
    from mergeedit.io import shard_writer

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_writer.ShardWriter, "write", full)
    _assert_clean_failure(run_cli("merge", cfg, out), out, "disk filled up", "partial output was removed")


def test_an_unexpected_error_with_brackets_in_its_text_is_one_line(tmp_path, models, run_cli, monkeypatch):
    """A gloo error reads "[../gloo/transport/tcp/pair.cc:553] Connection closed by peer": printed as text, not as rich
    markup (whose closing-tag parse raised MarkupError over the message and lost it)."""
    from mergeedit.io import shard_writer

    text = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29500"

    def broken(self, name, tensor):
        raise RuntimeError(text)

    monkeypatch.setattr(shard_writer.ShardWriter, "write", broken)
    cfg = write_config(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    result = run_cli("merge", cfg, tmp_path / "out")
    assert result.code == 1 and "Traceback" not in result.stderr
    assert " ".join(result.stderr.split()) == f"internal error: RuntimeError: {text} (set MERGEEDIT_DEBUG=1 for the traceback and please report it)"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_tensor_is_named(tmp_path, models, run_cli, bad):
    target = "model.layers.1.mlp.up_proj.weight"

    def poison(name, t):
        if name == target and t.dim() == 2:
            t = t.clone()
            t[3, 5] = bad
        return t

    sick = _copy_model(models["b"], tmp_path / "sick", poison)
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n  - model: {sick}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    _assert_clean_failure(run_cli("merge", cfg, out), out, str(sick), target, "NaN/Inf", "repair or replace")


def test_output_dtype_overflow_is_explained(tmp_path, models, run_cli):
    cfg = write_config(tmp_path, f"merge_method: linear\nparameters: {{normalize: false}}\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1.0e6}}\n")
    out = tmp_path / "out"
    _assert_clean_failure(run_cli("merge", cfg, out, "--dtype", "float16"), out, "overflows float16", "--dtype bfloat16")


def _linear(models) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n  - model: {models['b']}\n    parameters: {{weight: 1}}\n"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_folder(tmp_path, models, run_cli):
    parent = tmp_path / "ro"
    parent.mkdir()
    cfg = write_config(tmp_path, _linear(models))
    parent.chmod(0o555)
    try:
        result = run_cli("merge", cfg, parent / "out")
    finally:
        parent.chmod(0o755)
    _assert_clean_failure(result, parent / "out", str(parent), "writable")
    assert list(parent.iterdir()) == []


def test_read_only_filesystem(tmp_path, models, run_cli, monkeypatch):
    """EROFS as a read-only mount reports it (simulated: root would ignore a chmod, and tests cannot mount)."""
    import errno

    parent = tmp_path / "mnt"
    parent.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(parent)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    cfg = write_config(tmp_path, _linear(models))
    result = run_cli("merge", cfg, parent / "out")
    _assert_clean_failure(result, parent / "out", "Read-only file system", "writable disk")
    assert list(parent.iterdir()) == []
