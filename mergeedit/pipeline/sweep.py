"""`mergeedit sweep RECIPE --grid density=0.2,0.5,1 weight=0.5,0.7,1`: one R-SFT result, many merges, one table.

The recipe's R-SFT stages are trained once (the very stages `mergeedit run` caches, so a run and a sweep share them);
each grid point then overrides parameters of the recipe's merge, merges, and is scored on a validation split of the
edits: a deterministic subset (seeded) of the recipe's edits, so a sweep over 1,000 edits scores, say, 100. The result
lists every point with its scores and marks the Pareto front of reliability against locality (both higher is better).

Grid keys are parameters of the merge method: a shared one (lambda, normalize, ...) goes in the merge's top-level
`parameters`; a per-model one (weight, density, ...) goes on every `rsft` model entry. A merge of several batches
(the anchored strategy) is re-done per point; a chained recipe of several batches would need its R-SFT redone per
point, so it is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from ..core.errors import MergeEditError
from .checks import check_recipe_merge
from .grid import apply_point, grid_points, parse_grid, validation_split
from .run_dir import stable_hash
from .runner import RecipeRun, Reporter, load_delta

__all__ = ["SCORES", "apply_point", "grid_points", "parse_grid", "validation_split", "pareto_front", "run_sweep", "SweepResult"]

SCORES = ("rel", "gen", "loc", "loc_chat", "port", "rel_em", "gen_em", "ppl_drift_pct", "kl")
SCRATCH_MERGE = "sweep-merge"


# -- Pareto front ---------------------------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[Optional[float], Optional[float]]]) -> list[bool]:
    """For (x, y) pairs where higher is better in both, True where no other point is at least as good in both and
    strictly better in one. A missing value counts as worst."""
    def worst(v):
        return float("-inf") if v is None else v

    pts = [(worst(x), worst(y)) for x, y in points]
    return [not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in pts) for x, y in pts]


# -- the sweep ------------------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    recipe: str
    grid: dict[str, list]
    validation: dict
    points: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stages_run: list[str] = field(default_factory=list)
    stages_cached: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "grid": self.grid, "validation": self.validation, "points": self.points, "seconds": self.seconds}


def run_sweep(
    recipe_path: Path,
    grid_specs: Sequence[str] = (),
    *,
    validation: Optional[Union[int, float]] = None,
    seed: Optional[int] = None,
    reporter: Optional[Reporter] = None,
    force: Optional[list[str]] = None,
) -> SweepResult:
    """Train once, merge and score every grid point; writes <run dir>/sweep.json. CLI options override the recipe's
    `sweep:` section (grid, validation, seed)."""
    started = time.perf_counter()
    rr = RecipeRun(recipe_path, force=force, reporter=reporter)
    recipe, cfg = rr.recipe, rr.recipe.sweep
    grid, points, configs = _grid_configs(rr, grid_specs)
    s = rr.open_session()
    if recipe.sequential.strategy == "chained" and len(rr.batches(s.records)) > 1:
        raise MergeEditError(
            f"{rr.doc.where(('sequential',))}: a chained recipe of several batches merges after every batch, so each grid point would retrain; "
            "sweep with sequential.strategy: anchored or one batch"
        )
    for config in configs:  # every grid point's merge planned against the base now (ranges, dtypes), not after training
        check_recipe_merge(config, rr.doc, s.base_source, s.trainable, len(rr.batches(s.records)), anchored=True)
    size = validation if validation is not None else cfg.validation
    split_seed = seed if seed is not None else cfg.seed
    val_records = validation_split(s.records, size, split_seed)
    result = rr.new_result(s)
    pre, drift = rr.pre_edit_stages(s, val_records, result, prefix="sweep-")
    trained = rr.train_batches(s, result, merge=False)

    out = SweepResult(str(recipe_path), grid, {"size": len(val_records), "of": len(s.records), "seed": split_seed, "case_ids": [r.case_id for r in val_records]})
    for point, config in zip(points, configs):
        out.points.append({"params": point, "scores": _score_point(rr, s, trained, config, val_records, pre, drift)})
    s.run.discard(SCRATCH_MERGE)  # a full delta per point would fill the disk
    for p, on_front in zip(out.points, pareto_front([(p["scores"]["rel"], p["scores"]["loc"]) for p in out.points])):
        p["pareto"] = on_front
    out.seconds = time.perf_counter() - started
    out.stages_run, out.stages_cached = result.stages_run, result.stages_cached
    (rr.root / "sweep.json").write_text(json.dumps(out.to_dict(), indent=2))
    return out


def _grid_configs(rr: RecipeRun, grid_specs: Sequence[str]) -> tuple[dict[str, list], list[dict], list]:
    """The grid (the CLI's, else the recipe's sweep.grid), its points and each point's merge config: every mistake in
    them found before any training."""
    where = rr.doc.where(("merge",))
    if rr.merge_config is None:
        raise MergeEditError(f"{rr.recipe_path}: a sweep varies the merge, but the recipe has `merge: null`; add a merge section")
    grid = parse_grid(grid_specs) if grid_specs else {k: list(v) for k, v in (rr.recipe.sweep.grid or {}).items()}
    if not grid:
        raise MergeEditError(f"{rr.recipe_path}: no grid; pass --grid KEY=V1,V2 (e.g. density=0.2,0.5,1) or set sweep.grid in the recipe")
    points = grid_points(grid)
    configs = [apply_point(rr.merge_config, p, where) for p in points]  # bad keys fail before any training
    if not rr.recipe.eval.enabled:
        raise MergeEditError(f"{rr.doc.where(('eval', 'enabled'))}: a sweep scores every point; set eval.enabled: true")
    return grid, points, configs


def _score_point(rr: RecipeRun, s, trained, config, val_records, pre, drift) -> dict:
    """One grid point's scores on the validation edits: merged from the trained deltas, evaluated, cached as a stage."""
    from .evaluation_stage import post_edit_evaluation

    key = {"rsft": trained.rsft_ids, "merge": config.model_dump(), "pre": s.run.output_id("sweep-pre-eval"), "drift": drift.stage_id if drift else None, "eval": rr.eval_key()}

    def compute():
        delta, _ = rr.anchored_merge(s, trained.rsft_deltas, trained.rsft_ids, config, SCRATCH_MERGE)
        load_delta(s.model, delta)
        scored = post_edit_evaluation(s.model, s.tokenizer, val_records, s.fmt, rr.recipe.eval, pre, drift)
        return {"metrics": scored["metrics"]}

    _, scored = s.run.produce_json(f"sweep-eval-{stable_hash(key)[:8]}", key, compute)
    return {k: scored["metrics"].get(k, {}).get("value") for k in SCORES}
