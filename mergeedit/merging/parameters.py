"""Resolve a parameter for one tensor and one model, with mergekit's forms and precedence.

Forms: a scalar; a list of numbers (a gradient over the layers of a slice, interpolated at t = i/(n-1)); a list of
{filter, value} entries (the first whose filter occurs in the tensor name wins; no filter or "*" is the fallback).
Precedence, highest first: slice source > output slice > global.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from .methods.spec import Param
from .schema import ConditionalParameter

_MISSING = object()


def evaluate_setting(setting: Any, tensor_name: str, t: float, param: Param) -> Any:
    """The value of one setting for `tensor_name` at gradient position `t` (None when a filter list matches nothing)."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, ConditionalParameter) for e in setting):
            for cond in setting:
                if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                    return evaluate_setting(cond.value, tensor_name, t, param)
            return None
        values = [param.coerce(e) for e in setting]
        if not all(isinstance(v, float) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return param.coerce((1 - frac) * values[i0] + frac * values[i1])
    return param.coerce(setting)


def resolve(param: Param, scopes: Iterable[Optional[dict]], tensor_name: str, t: float) -> Any:
    """First scope (highest precedence first) that sets `param` and yields a value; else its default.

    Raises KeyError when a required parameter is set nowhere, ValueError when a value has the wrong type.
    """
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t, param)
            if value is not None:
                return value
    if param.required:
        raise KeyError(param.name)
    return param.default
