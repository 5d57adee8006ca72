"""The registry of merge methods, by the names mergekit's YAML uses."""

from __future__ import annotations

from ...core.errors import MergeEditError
from ...core.yaml_source import did_you_mean
from .arcee_fusion import ARCEE_FUSION
from .linear import LINEAR
from .model_stock import MODEL_STOCK
from .nearswap import NEARSWAP
from .passthrough import PASSTHROUGH
from .ram import RAM, RAMPLUS_TL
from .sce import SCE
from .sparsify import BREADCRUMBS, BREADCRUMBS_TIES, DELLA, DELLA_LINEAR
from .spec import MergeInputs, MergeMethod, Param, TensorStatistics
from .spherical import KARCHER, MULTISLERP, NUSLERP, SLERP
from .task_arithmetic import DARE_LINEAR, DARE_TIES, TASK_ARITHMETIC, TIES

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        LINEAR,
        TASK_ARITHMETIC,
        TIES,
        DARE_TIES,
        DARE_LINEAR,
        BREADCRUMBS,
        BREADCRUMBS_TIES,
        DELLA,
        DELLA_LINEAR,
        SCE,
        SLERP,
        NUSLERP,
        MULTISLERP,
        KARCHER,
        MODEL_STOCK,
        PASSTHROUGH,
        RAM,
        RAMPLUS_TL,
        NEARSWAP,
        ARCEE_FUSION,
    )
}

def get_method(name: str, where: str) -> MergeMethod:
    if name in METHODS:
        return METHODS[name]
    raise MergeEditError(f"{where}: unknown merge_method '{name}'{did_you_mean(name, METHODS)}; use one of {', '.join(METHODS)}")


def all_parameter_names() -> set[str]:
    return {p.name for m in METHODS.values() for p in m.params}


__all__ = ["METHODS", "MergeInputs", "MergeMethod", "Param", "TensorStatistics", "get_method", "all_parameter_names"]
