"""The merge-parameter grid shared by `mergeedit sweep` and `merge: {auto: ...}`: parse a grid, expand its points, apply
one point to a merge config, and pick a seeded validation split of the edits. Pure functions (no run, no model)."""

from __future__ import annotations

import itertools
import random
from typing import Sequence, Union

from ..core.errors import MergeEditError
from ..core.yaml_source import did_you_mean
from ..editing.records import EditRecord
from ..merging.methods import get_method
from ..merging.schema import MergeConfig

__all__ = ["parse_grid", "grid_points", "apply_point", "validation_split"]


# -- grid -----------------------------------------------------------------------------------------------------------
def _value(text: str, where: str) -> Union[float, bool]:
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return float(text)
    except ValueError:
        raise MergeEditError(f"{where}: '{text}' is not a number (or true/false)") from None


def parse_grid(specs: Sequence[str]) -> dict[str, list]:
    """["density=0.2,0.5,1", "weight=0.5,1"] -> {"density": [0.2, 0.5, 1.0], "weight": [0.5, 1.0]} (order kept)."""
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise MergeEditError(f"--grid '{spec}': write KEY=V1,V2,... (e.g. density=0.2,0.5,1)")
        if key in grid:
            raise MergeEditError(f"--grid: '{key}' is given twice; list all its values once: {key}=V1,V2,...")
        grid[key] = [_value(v, f"--grid {key}") for v in values.split(",") if v.strip()]
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def apply_point(config: MergeConfig, point: dict, where: str) -> MergeConfig:
    """The merge with `point`'s parameters set: shared ones globally, per-model ones on every `rsft` entry."""
    method = get_method(config.merge_method, where)
    params = {p.name: p for p in method.params}
    update: dict = {}
    global_params = dict(config.parameters or {})
    models = [m.model_copy(deep=True) for m in config.models] if config.models else None
    for key, value in point.items():
        if key not in params:
            raise MergeEditError(f"{where}: grid key '{key}' is not a parameter of merge_method {config.merge_method}{did_you_mean(key, params)}; use one of {', '.join(params)}")
        try:
            value = params[key].coerce(value)
        except (TypeError, ValueError) as exc:
            raise MergeEditError(f"{where}: grid value {key}={value!r} for {config.merge_method}: {exc}; change the grid (--grid or sweep.grid)") from None
        if params[key].scope == "shared":
            global_params[key] = value
            continue
        if not models or not any(m.model == "rsft" for m in models):
            raise MergeEditError(f"{where}: grid key '{key}' is set per model, but the merge has no `models:` entry `rsft` to set it on")
        for m in models:
            if m.model == "rsft":
                m.parameters = {**(m.parameters or {}), key: value}
    update["parameters"] = global_params or None
    if models is not None:
        update["models"] = models
    return config.model_copy(update=update)


# -- validation split and Pareto front -------------------------------------------------------------------------------
def validation_split(records: Sequence[EditRecord], size: Union[int, float], seed: int) -> list[EditRecord]:
    """A seeded subset in dataset order: `size` < 1 is a fraction (at least one edit), otherwise a count."""
    n = len(records)
    if size <= 0:
        raise MergeEditError(f"sweep validation size must be positive, got {size}")
    k = max(1, round(n * size)) if size < 1 else int(size)
    if k > n:
        raise MergeEditError(f"sweep validation asks for {k} edits but the recipe has {n}; use a fraction (0.2) or a smaller count")
    picked = sorted(random.Random(seed).sample(range(n), k))
    return [records[i] for i in picked]


