"""The registry of merge methods, by the names mergekit's YAML uses."""

from __future__ import annotations

from ..errors import MergeEditError
from ..yaml_source import did_you_mean
from .linear import LINEAR
from .passthrough import PASSTHROUGH
from .spec import MergeInputs, MergeMethod, Param, TensorStatistics
from .task_arithmetic import DARE_LINEAR, DARE_TIES, TASK_ARITHMETIC, TIES

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        LINEAR,
        TASK_ARITHMETIC,
        TIES,
        DARE_TIES,
        DARE_LINEAR,
        PASSTHROUGH,
    )
}

# mergekit methods we know of but do not implement yet: named in the error so users know it is not a typo.
MERGEKIT_ONLY = tuple(
    name
    for name in (
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "sce",
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "model_stock",
        "ram",
        "ramplus_tl",
        "nearswap",
        "arcee_fusion",
    )
    if name not in METHODS
)


def get_method(name: str, where: str) -> MergeMethod:
    if name in METHODS:
        return METHODS[name]
    if name in MERGEKIT_ONLY:
        raise MergeEditError(f"{where}: merge_method '{name}' is a mergekit method mergeedit does not implement yet; use one of {', '.join(METHODS)}")
    raise MergeEditError(f"{where}: unknown merge_method '{name}'{did_you_mean(name, METHODS)}; use one of {', '.join(METHODS)}")


def all_parameter_names() -> set[str]:
    return {p.name for m in METHODS.values() for p in m.params}


__all__ = ["METHODS", "MergeInputs", "MergeMethod", "Param", "TensorStatistics", "get_method", "all_parameter_names"]
