"""Pickled checkpoints: refused by default; with --allow-pickle loaded weights_only and merged like safetensors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import write_config
from safetensors.torch import load_file

CONFIG = """\
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.25}}
  - model: {b}
    parameters: {{weight: 0.75}}
"""


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _pickled_copy(src: Path, dst: Path, shards: int = 2) -> Path:
    """The same weights as pytorch_model-0000i-of-0000n.bin files plus their index, as older checkpoints ship them."""
    dst.mkdir(parents=True)
    sd = _state_dict(src)
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: sd[n] for n in part}, dst / fname)
        weight_map.update({n: fname for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_pickled_inputs_are_refused_without_the_flag(tmp_path, models, run_cli, cache):
    a = _pickled_copy(models["a"], tmp_path / "a_bin")
    cfg = write_config(tmp_path, CONFIG.format(a=a, b=models["b"]))
    r = run_cli("merge", cfg, tmp_path / "out")
    assert r.code == 2
    assert "pickled weights" in r.stderr and "--allow-pickle" in r.stderr and "a_bin" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not cache.exists()


def test_allow_pickle_merges_the_same_bytes_as_safetensors(tmp_path, models, run_cli, cache):
    a = _pickled_copy(models["a"], tmp_path / "a_bin")
    b = _pickled_copy(models["b"], tmp_path / "b_bin", shards=1)
    (b / "pytorch_model.bin.index.json").unlink()
    (b / "pytorch_model-00001-of-00001.bin").rename(b / "pytorch_model.bin")
    ref = run_cli("merge", write_config(tmp_path, CONFIG.format(a=models["a"], b=models["b"]), "ref.yaml"), tmp_path / "ref")
    assert ref.code == 0
    got = run_cli("merge", write_config(tmp_path, CONFIG.format(a=a, b=b)), tmp_path / "out", "--allow-pickle")
    assert got.code == 0, got.stderr
    want, have = _state_dict(tmp_path / "ref"), _state_dict(tmp_path / "out")
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)
    converted = sorted(p.name for p in (cache / "from-pickle").iterdir())
    assert len(converted) == 2 and converted[0].startswith("a_bin-")
    # Converted once: a second merge reuses the cache (the pickles could even be gone).
    for p in a.glob("*.bin"):
        p.unlink()
    (a / "pytorch_model.bin.index.json").unlink()
    (a / "pytorch_model.bin").write_bytes(b"")  # a different file now: the cache key changes, so it must not be reused
    again = run_cli("merge", write_config(tmp_path, CONFIG.format(a=a, b=b), "again.yaml"), tmp_path / "again", "--allow-pickle")
    assert again.code == 2 and "weights_only" in again.stderr


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(_RunsCode.target),))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, run_cli, models, cache):
    evil = tmp_path / "evil"
    evil.mkdir()
    _RunsCode.target = str(tmp_path / "pwned")
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _RunsCode()}, f)
    cfg = write_config(tmp_path, CONFIG.format(a=evil, b=models["b"]))
    r = run_cli("merge", cfg, tmp_path / "out", "--allow-pickle")
    assert r.code == 2
    assert "pytorch_model.bin" in r.stderr and "weights_only=True" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists()


def test_a_pickle_without_a_state_dict_is_refused(tmp_path, run_cli, models, cache):
    odd = tmp_path / "odd"
    odd.mkdir()
    torch.save([torch.zeros(2)], odd / "model.pt")
    r = run_cli("merge", write_config(tmp_path, CONFIG.format(a=odd, b=models["b"])), tmp_path / "out", "--allow-pickle")
    assert r.code == 2 and "flat dict of named tensors" in r.stderr


def test_tied_and_nested_state_dicts_convert(tmp_path, cache):
    from mergeedit.io.pickle_import import import_pickled_folder

    src = tmp_path / "tied"
    src.mkdir()
    emb = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    torch.save({"state_dict": {"embed.weight": emb, "lm_head.weight": emb, "row": emb[1]}}, src / "model.pt")
    out = import_pickled_folder(src)
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["embed.weight"], emb) and torch.equal(got["lm_head.weight"], emb) and torch.equal(got["row"], emb[1])
    assert import_pickled_folder(src) == out  # cached
