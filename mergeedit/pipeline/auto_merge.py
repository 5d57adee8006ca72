"""`merge: {auto: ...}`: choose the merge operating point inside a run.

Each candidate (a combination of merge parameters, e.g. lambda x density, built with `mergeedit sweep`'s grid
machinery) is merged and scored by a caller-supplied function on a validation split of the batch's edits (reliability)
plus retain probes (locality). The rule:

1. among the candidates whose locality meets ``floor``, keep the one with the best reliability; ties go to the higher
   locality, then to the earlier candidate in grid order (the first key varying slowest);
2. when none meets the floor, keep the one with the best locality (ties: higher reliability, then earlier), and flag
   the choice (``met_floor = False``) so the run and the model card say so.

A missing score (None) counts as the worst value. The full table of candidates is returned for the run's log and the
model card.

Usage from a run (the runner wires it):

    section = MergeAuto.model_validate(recipe_merge["auto"])
    val = auto_validation(records, section)
    choice = choose_merge(merge_config, section, lambda cfg, point: score(cfg, val), where="recipe.yaml:12")
    merged_config = choice.config
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core.errors import MergeEditError
from ..editing.records import EditRecord
from ..merging.schema import MergeConfig
from .grid import apply_point, grid_points, validation_split

__all__ = ["MergeAuto", "AutoChoice", "pick_point", "choose_merge", "auto_validation", "describe_choice", "DEFAULT_CANDIDATES"]

DEFAULT_CANDIDATES: dict[str, list[float]] = {"lambda": [0.5, 0.7, 1.0], "density": [0.2, 0.5, 1.0]}


class MergeAuto(BaseModel):
    """The ``auto:`` section of a recipe's merge (the recipe schema includes it as ``merge.auto``)."""

    model_config = ConfigDict(extra="forbid")

    candidates: dict[str, list[Union[float, bool]]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_CANDIDATES.items()},
        description="Merge parameter -> values to try (every combination, like `mergeedit sweep --grid`); shared parameters (lambda) go in the merge's parameters, per-model ones (density, weight) on the rsft entry.",
    )
    floor: float = Field(0.95, ge=0, le=1, description="Locality a candidate must reach; the best reliability among those that do wins (none does: the best locality, flagged).")
    validation: Union[int, float] = Field(0.2, gt=0, description="Validation split of the batch's edits the candidates are scored on: a fraction (< 1) or a count.")
    seed: int = Field(0, description="Seed of the validation split.")
    reliability: str = Field("rel", description="Score key maximised on the validation edits (rel: teacher-forced reliability; rel_em: by generation).")
    locality: str = Field("retain_loc", description="Score key held to the floor: retain_loc, the share of retain-text positions (rsft.retain.path, default the shipped retain set; never the evaluation's locality prompts) whose most likely next token is still the unedited model's.")

    @field_validator("candidates")
    @classmethod
    def _non_empty(cls, v):
        if not v or any(not values for values in v.values()):
            raise ValueError("candidates needs at least one parameter with at least one value, e.g. {lambda: [0.5, 1.0]}")
        return v


@dataclass
class AutoChoice:
    """The chosen candidate, whether it met the floor, and every candidate's scores (for the run and the model card)."""

    index: int
    params: dict
    scores: dict
    met_floor: bool
    floor: float
    table: list[dict] = field(default_factory=list)  # [{params, scores, meets_floor, chosen}]
    config: Optional[MergeConfig] = None  # the merge with the chosen parameters (choose_merge)

    def to_json(self) -> dict:
        return {"index": self.index, "params": self.params, "scores": self.scores, "met_floor": self.met_floor, "floor": self.floor, "table": self.table}

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        flag = "" if self.met_floor else f" (NO candidate reached locality {self.floor}: best locality kept)"
        return f"merge auto -> {params}: {', '.join(f'{k} {v:.3f}' for k, v in self.scores.items() if isinstance(v, (int, float)))}{flag}"


def _num(v: Any) -> float:
    return float("-inf") if v is None else float(v)


def pick_point(
    points: Sequence[dict], scores: Sequence[dict], floor: float, *, reliability: str = "rel", locality: str = "retain_loc"
) -> AutoChoice:
    """Apply the rule (module docstring) to candidates ``points`` with their ``scores`` (same order)."""
    if not points or len(points) != len(scores):
        raise MergeEditError(f"merge auto: {len(points)} candidate(s) but {len(scores)} score record(s); there must be one of each, at least one")
    rel = [_num(s.get(reliability)) for s in scores]
    loc = [_num(s.get(locality)) for s in scores]
    meets = [v >= floor for v in loc]
    order = range(len(points))
    if any(meets):
        best = min((i for i in order if meets[i]), key=lambda i: (-rel[i], -loc[i], i))
    else:
        best = min(order, key=lambda i: (-loc[i], -rel[i], i))
    table = [{"params": dict(p), "scores": dict(s), "meets_floor": m, "chosen": i == best} for i, (p, s, m) in enumerate(zip(points, scores, meets))]
    return AutoChoice(best, dict(points[best]), dict(scores[best]), meets[best], floor, table)


def choose_merge(
    config: MergeConfig,
    section: MergeAuto,
    score: Callable[[MergeConfig, dict], dict],
    *,
    where: str = "merge.auto",
) -> AutoChoice:
    """Build every candidate merge (sweep.apply_point over sweep.grid_points), score each with ``score(config,
    point) -> {"rel": ..., "loc": ...}``, pick one. Bad parameter names fail before anything is scored."""
    points = grid_points(section.candidates)
    configs = [apply_point(config, p, where) for p in points]
    scores = []
    for cfg, point in zip(configs, points):
        s = score(cfg, point)
        if not isinstance(s, dict):
            raise TypeError(f"merge auto: the score function must return a dict of scores, got {type(s).__name__}")
        scores.append(s)
    choice = pick_point(points, scores, section.floor, reliability=section.reliability, locality=section.locality)
    choice.config = configs[choice.index]
    return choice


def auto_validation(records: Sequence[EditRecord], section: MergeAuto) -> list[EditRecord]:
    """The seeded validation split of the batch's edits the candidates are scored on (sweep.validation_split)."""
    return validation_split(records, section.validation, section.seed)


def describe_choice(choice: dict) -> str:
    """One line for the run's summary from a stored choice (AutoChoice.to_json, with an optional "batch")."""
    where = f" (batch {choice['batch']})" if choice.get("batch") is not None else ""
    params = ", ".join(f"{k}={v}" for k, v in choice["params"].items())
    scores = ", ".join(f"{k} {v:.3f}" for k, v in choice["scores"].items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    flag = "" if choice["met_floor"] else f"; NO candidate reached locality {choice['floor']}: the best locality kept"
    return f"merge auto{where} -> {params} of {len(choice.get('table', []))} candidates: {scores}{flag}"
