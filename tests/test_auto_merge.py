"""`merge: {auto: ...}` (pipeline/auto_merge.py): the chooser on hand-made score tables, the schema section, and the
candidate merges built with the sweep's grid machinery."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from mergeedit.core.errors import MergeEditError
from mergeedit.merging.schema import MergeConfig
from mergeedit.pipeline.auto_merge import MergeAuto, auto_validation, choose_merge, pick_point

POINTS = [{"lambda": lam, "density": d} for lam in (0.5, 1.0) for d in (0.2, 0.5, 1.0)]
# lambda 0.5 keeps locality, lambda 1.0 buys reliability; (1.0, 0.2) is the best point that still meets 0.95
TABLE = {
    (0.5, 0.2): {"rel": 0.70, "retain_loc": 0.99},
    (0.5, 0.5): {"rel": 0.78, "retain_loc": 0.97},
    (0.5, 1.0): {"rel": 0.84, "retain_loc": 0.93},
    (1.0, 0.2): {"rel": 0.88, "retain_loc": 0.95},
    (1.0, 0.5): {"rel": 0.94, "retain_loc": 0.90},
    (1.0, 1.0): {"rel": 0.97, "retain_loc": 0.81},
}


def scores_of(points):
    return [TABLE[(p["lambda"], p["density"])] for p in points]


def test_picks_the_best_reliability_whose_locality_meets_the_floor():
    choice = pick_point(POINTS, scores_of(POINTS), 0.95)
    assert choice.params == {"lambda": 1.0, "density": 0.2} and choice.index == 3 and choice.met_floor
    assert [row["meets_floor"] for row in choice.table] == [True, True, False, True, False, False]
    assert [row["chosen"] for row in choice.table] == [False, False, False, True, False, False]
    assert pick_point(POINTS, scores_of(POINTS), 0.97).params == {"lambda": 0.5, "density": 0.5}
    assert pick_point(POINTS, scores_of(POINTS), 0.0).params == {"lambda": 1.0, "density": 1.0}
    assert "lambda=1.0, density=0.2" in choice.describe() and "NO candidate" not in choice.describe()


def test_no_candidate_meets_the_floor_keeps_the_best_locality_flagged():
    choice = pick_point(POINTS, scores_of(POINTS), 0.995)
    assert choice.params == {"lambda": 0.5, "density": 0.2} and not choice.met_floor
    assert not any(row["meets_floor"] for row in choice.table)
    assert "NO candidate reached locality 0.995" in choice.describe()
    assert choice.to_json()["met_floor"] is False


def test_ties_are_broken_deterministically():
    pts = [{"lambda": 0.1}, {"lambda": 0.2}, {"lambda": 0.3}, {"lambda": 0.4}]
    # equal reliability among those meeting the floor: the higher locality, then the earlier candidate
    assert pick_point(pts, [{"rel": 0.9, "retain_loc": 0.96}, {"rel": 0.9, "retain_loc": 0.98}, {"rel": 0.9, "retain_loc": 0.98}, {"rel": 0.95, "retain_loc": 0.5}], 0.95).index == 1
    # none meets: equal locality, then the higher reliability, then the earlier
    assert pick_point(pts, [{"rel": 0.1, "retain_loc": 0.5}, {"rel": 0.3, "retain_loc": 0.5}, {"rel": 0.3, "retain_loc": 0.5}, {"rel": 0.9, "retain_loc": 0.4}], 0.95).index == 1
    # a missing score counts as the worst
    assert pick_point(pts[:2], [{"rel": None, "retain_loc": 0.99}, {"rel": 0.1, "retain_loc": 0.99}], 0.95).index == 1
    assert pick_point(pts[:2], [{"rel": 0.9, "retain_loc": None}, {"rel": 0.1, "retain_loc": 0.99}], 0.95).index == 1
    with pytest.raises(MergeEditError, match="one of each"):
        pick_point(pts, [], 0.95)


def test_choose_merge_scores_every_grid_candidate_and_returns_its_config():
    config = MergeConfig.model_validate(
        {"merge_method": "ties", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 0.5}}], "parameters": {"normalize": True}}
    )
    section = MergeAuto(candidates={"lambda": [0.5, 1.0], "density": [0.2, 0.5, 1.0]}, floor=0.95)
    seen = []

    def score(cfg, point):
        seen.append(point)
        assert cfg.parameters["lambda"] == point["lambda"] and cfg.models[0].parameters["density"] == point["density"]
        return TABLE[(point["lambda"], point["density"])]

    choice = choose_merge(config, section, score)
    assert seen == POINTS  # grid order: the first key varies slowest
    assert choice.params == {"lambda": 1.0, "density": 0.2}
    assert choice.config.parameters == {"normalize": True, "lambda": 1.0} and choice.config.models[0].parameters == {"weight": 1.0, "density": 0.2}
    assert config.parameters == {"normalize": True}  # the recipe's merge is left alone
    with pytest.raises(MergeEditError, match="grid key 'densty'"):
        choose_merge(config, MergeAuto(candidates={"densty": [0.2]}), score, where="recipe.yaml:9")


def test_the_auto_section_schema_and_the_validation_split():
    section = MergeAuto()
    assert section.floor == 0.95 and section.validation == 0.2 and section.seed == 0 and set(section.candidates) == {"lambda", "density"}
    for bad in ({"floor": 1.5}, {"candidates": {}}, {"candidates": {"lambda": []}}, {"flor": 0.9}, {"validation": 0}):
        with pytest.raises(ValidationError):
            MergeAuto.model_validate(bad)
    records = [SimpleNamespace(case_id=str(i)) for i in range(20)]
    a = auto_validation(records, MergeAuto(validation=5, seed=1))
    assert len(a) == 5 and [r.case_id for r in a] == [r.case_id for r in auto_validation(records, MergeAuto(validation=5, seed=1))]
