"""Stage `adapter` (recipe `output: {adapter: {rank: R}}`): the exported model's difference from the base, as a PEFT
LoRA adapter published at RUN/adapter beside RUN/model (merging/extract_lora.py does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..core.units import parse_size
from ..merging.extract_lora import ExtractOptions, extract_lora
from .recipe import Recipe
from .run_dir import RunDir, Stage

STAGE = "adapter"
FOLDER = "adapter"


def adapter_stage(run: RunDir, recipe: Recipe, export: Stage, base_folder: Path, root: Path) -> Optional[Stage]:
    """Extract RUN/adapter from the export stage's model against the base; None when the recipe asks for none."""
    spec = recipe.output.adapter
    if spec is None:
        return None
    inputs = {"upstream": export.output_id, "adapter": spec.model_dump(), "base": recipe.model.base}

    def write(tmp: Path) -> None:
        options = ExtractOptions(
            rank=spec.rank, sv_energy=spec.sv_energy, rank_for=list((spec.rank_for or {}).items()), skip=list(spec.skip or []), dtype=spec.dtype,
            memory_budget=parse_size(recipe.output.memory_budget, "output.memory_budget") if recipe.output.memory_budget else None,
        )
        extract_lora(str(export.path / "model"), str(base_folder), tmp / FOLDER, options, base_name=recipe.model.base)

    stage = run.produce(STAGE, inputs, write, detail=str(root / FOLDER))
    if run.dist.is_main:
        link = root / FOLDER
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            import shutil

            shutil.rmtree(link)
        link.symlink_to((stage.path / FOLDER).relative_to(root), target_is_directory=True)
    return stage
