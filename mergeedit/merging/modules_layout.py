"""mergekit's third config layout, `modules:`, rewritten as the `models:`/`slices:` layout the planner reads.

mergekit describes an architecture as named modules (a vision-language model has a text decoder and a vision tower);
a plain decoder such as Llama has exactly one, which mergekit 0.1.5 names `default`: `modules: {default: {...}}`
merges such a model exactly as the same `models:` or `slices:` would, except that the module may carry its own
`parameters`, resolved after the slice's and before the global ones (slice source > output slice > module > global).
mergekit 0.1.5 fails on any other module name with `KeyError: '<name>'`; here that is a one-line error instead.

With one module, module parameters apply wherever global ones do, so they fold into the global parameters: a module
setting shadows the global one, except that a filter list matching no filter falls through to the global setting,
just as it falls through to the next scope in mergekit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ..core.errors import MergeEditError
from ..core.yaml_source import YamlDocument
from .schema import ConditionalParameter, MergeConfig, Parameters

SINGLE_MODULE = "default"  # mergekit's name for the one module of a decoder-only architecture


@dataclass
class ModuleDocument(YamlDocument):
    """The YAML of a `modules:` config, answering locations asked in the flattened layout with the module's lines."""

    module: str = SINGLE_MODULE
    module_parameters: frozenset = frozenset()

    def where(self, key_path: Iterable[Any]) -> str:
        key_path = tuple(key_path)
        head = key_path[:1]
        module_parameter = bool(self.module_parameters) and (len(key_path) == 1 or key_path[1] in self.module_parameters)
        in_module = head in (("models",), ("slices",)) or (head == ("parameters",) and module_parameter)
        return super().where(("modules", self.module) + key_path if in_module else key_path)


def _as_conditions(setting: Any) -> list[ConditionalParameter]:
    """A setting as a filter list that evaluates the same (a plain value or gradient becomes a catch-all entry)."""
    if isinstance(setting, ConditionalParameter):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, ConditionalParameter) for e in setting):
        return list(setting)
    if isinstance(setting, list) and not setting:
        return []  # an empty list sets nothing
    return [ConditionalParameter(value=setting)]


def _may_set_nothing(setting: Any) -> bool:
    """True when a setting yields no value for some tensors (a filter list without a catch-all, or an empty list)."""
    conditions = _as_conditions(setting)
    return not any(c.filter in (None, "*") for c in conditions)


def layered_parameters(high: Parameters, low: Parameters) -> Parameters:
    """One parameter scope that resolves like looking in `high` first and then in `low`."""
    if not high or not low:
        return high or low
    out = dict(low)
    for key, setting in high.items():
        if key in low and _may_set_nothing(setting):
            out[key] = _as_conditions(setting) + _as_conditions(low[key])
        else:
            out[key] = setting
    return out


def flatten_modules(config: MergeConfig, doc: YamlDocument) -> tuple[MergeConfig, YamlDocument]:
    """A `modules:` config as the equivalent `models:`/`slices:` config (other configs are returned unchanged)."""
    if not config.modules:
        return config, doc
    names = list(config.modules)
    if names != [SINGLE_MODULE]:
        bad = next((n for n in names if n != SINGLE_MODULE), names[0])
        raise MergeEditError(
            f"{doc.where(('modules', bad))}: module '{bad}' is not a module of a decoder-only model; such models have one module, "
            f"'{SINGLE_MODULE}' (multi-module architectures are not supported), so rename it to '{SINGLE_MODULE}' or use 'models'/'slices'"
        )
    module = config.modules[SINGLE_MODULE]
    flat = config.model_copy(update={
        "modules": None,
        "models": module.models,
        "slices": module.slices,
        "parameters": layered_parameters(module.parameters, config.parameters),
    })
    located = ModuleDocument(doc.path, doc.data, doc.lines, SINGLE_MODULE, frozenset(module.parameters or {}))
    return flat, located
