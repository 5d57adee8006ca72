"""Unit tests for mergeedit.merging.parameters: setting forms (scalar, gradient, filter list) and scope precedence."""

from __future__ import annotations

import pytest

from mergeedit.merging.methods.spec import Param
from mergeedit.merging.parameters import evaluate_setting, resolve
from mergeedit.merging.schema import ConditionalParameter

WEIGHT = Param("weight", float, "input")  # required
DENSITY = Param("density", float, "non_base", 1.0)
NORMALIZE = Param("normalize", bool, "shared", True)
FLAG = Param("flag", bool, "shared")  # required bool

NAME = "model.layers.3.mlp.down_proj.weight"


def C(value, filter=None) -> ConditionalParameter:
    return ConditionalParameter(value=value, filter=filter) if filter is not None else ConditionalParameter(value=value)


# ----------------------------------------------------------------------------------------------------------------------
# Param.coerce
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [(1, 1.0), (0.25, 0.25), (-3, -3.0), ("0.5", 0.5), ("1e-3", 0.001)])
def test_float_coerce(value, expected):
    out = WEIGHT.coerce(value)
    assert out == expected and type(out) is float


@pytest.mark.parametrize(
    "value,expected",
    [(True, True), (False, False), ("true", True), ("False", False), ("TRUE", True), (1, True), (0, False), (1.0, True)],
)
def test_bool_coerce(value, expected):
    assert NORMALIZE.coerce(value) is expected


@pytest.mark.parametrize(
    "param,value",
    [
        (WEIGHT, True), (WEIGHT, "abc"), (WEIGHT, None), (WEIGHT, [1.0]),
        (NORMALIZE, 2), (NORMALIZE, "yes"), (NORMALIZE, 0.5), (NORMALIZE, None),
    ],
)
def test_coerce_wrong_type_raises_value_error(param, value):
    with pytest.raises(ValueError, match="expected a"):
        param.coerce(value)


def test_required_flag():
    assert WEIGHT.required and FLAG.required
    assert not DENSITY.required and not NORMALIZE.required


# ----------------------------------------------------------------------------------------------------------------------
# evaluate_setting: scalars and gradients
# ----------------------------------------------------------------------------------------------------------------------


def test_scalar_ignores_t_and_name():
    for t in (0.0, 0.3, 1.0):
        assert evaluate_setting(0.7, NAME, t, WEIGHT) == 0.7
        assert evaluate_setting(2, "", t, WEIGHT) == 2.0
        assert evaluate_setting(False, NAME, t, NORMALIZE) is False


@pytest.mark.parametrize(
    "values,t,expected",
    [
        ([0, 1], 0.0, 0.0),
        ([0, 1], 0.25, 0.25),
        ([0, 1], 0.5, 0.5),
        ([0, 1], 1.0, 1.0),
        ([1, 2, 4], 0.0, 1.0),
        ([1, 2, 4], 0.25, 1.5),
        ([1, 2, 4], 0.5, 2.0),
        ([1, 2, 4], 0.75, 3.0),
        ([1, 2, 4], 1.0, 4.0),
        ([0.0, 10.0, 20.0, -10.0], 0.5, 15.0),  # scaled 1.5 -> halfway between 10 and 20
        ([0.0, 10.0, 20.0, -10.0], 5 / 6, 5.0),  # scaled 2.5 -> halfway between 20 and -10
        ([0.0, 10.0, 20.0, -10.0], 1 / 3, 10.0),  # exactly on an anchor
        ([3.0], 0.6, 3.0),  # one anchor: constant
        (["0.5", 1], 0.5, 0.75),  # string numbers coerced first
    ],
)
def test_gradient_linear_interpolation(values, t, expected):
    out = evaluate_setting(values, NAME, t, WEIGHT)
    assert type(out) is float
    assert out == pytest.approx(expected, abs=1e-12)


def test_gradient_over_layers_of_a_slice():
    # five layers: t = i / 4
    got = [evaluate_setting([0.0, 1.0, 0.5], NAME, i / 4, DENSITY) for i in range(5)]
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5])


@pytest.mark.parametrize(
    "t,expected",
    [(0.0, True), (0.2, True), (0.49, True), (0.5, False), (0.99, False), (1.0, True)],
)
def test_bool_list_picks_int_t_times_len_minus_one(t, expected):
    # values[int(t * (len - 1))]: no interpolation for booleans
    assert evaluate_setting([True, False, True], NAME, t, NORMALIZE) is expected


def test_bool_list_with_numbers_and_strings():
    assert evaluate_setting([0, 1], NAME, 0.9, NORMALIZE) is False  # int(0.9) = 0
    assert evaluate_setting([0, 1], NAME, 1.0, NORMALIZE) is True
    assert evaluate_setting(["false", "true", "true", "false"], NAME, 0.5, NORMALIZE) is True  # int(1.5) = 1


def test_gradient_with_bad_entry_raises_value_error():
    with pytest.raises(ValueError):
        evaluate_setting([0.5, "abc"], NAME, 0.0, WEIGHT)
    with pytest.raises(ValueError):
        evaluate_setting([True, 2], NAME, 0.0, NORMALIZE)


def test_scalar_wrong_type_raises_value_error():
    with pytest.raises(ValueError):
        evaluate_setting("heavy", NAME, 0.0, WEIGHT)
    with pytest.raises(ValueError):
        evaluate_setting(0.5, NAME, 0.0, NORMALIZE)


# ----------------------------------------------------------------------------------------------------------------------
# evaluate_setting: filter lists
# ----------------------------------------------------------------------------------------------------------------------


def test_filter_first_matching_substring_wins():
    setting = [C(0.1, "self_attn"), C(0.2, "mlp"), C(0.3, "down_proj"), C(0.9)]
    assert evaluate_setting(setting, NAME, 0.0, WEIGHT) == 0.2  # "mlp" comes before "down_proj"
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.0, WEIGHT) == 0.1
    assert evaluate_setting(setting, "x.down_proj.y", 0.0, WEIGHT) == 0.3


@pytest.mark.parametrize("fallback", [C(0.9), C(0.9, "*")])
def test_filter_fallback_none_or_star(fallback):
    setting = [C(0.1, "self_attn"), fallback]
    assert evaluate_setting(setting, "model.norm.weight", 0.0, WEIGHT) == 0.9
    assert evaluate_setting(setting, "model.layers.0.self_attn.o_proj.weight", 0.0, WEIGHT) == 0.1


def test_filter_fallback_first_in_list_wins_over_later_specific_entry():
    # order decides, not specificity: a leading fallback matches everything
    setting = [C(0.9, "*"), C(0.1, "mlp")]
    assert evaluate_setting(setting, NAME, 0.0, WEIGHT) == 0.9


def test_filter_no_match_returns_none():
    setting = [C(0.1, "self_attn"), C(0.2, "embed_tokens")]
    assert evaluate_setting(setting, NAME, 0.0, WEIGHT) is None
    assert evaluate_setting([], NAME, 0.0, WEIGHT) is None


def test_single_conditional_parameter_not_in_list():
    assert evaluate_setting(C(0.4, "mlp"), NAME, 0.0, WEIGHT) == 0.4
    assert evaluate_setting(C(0.4, "lm_head"), NAME, 0.0, WEIGHT) is None


def test_filter_value_may_be_a_gradient():
    setting = [C([0.0, 1.0], "mlp"), C([1, 2, 4])]
    assert evaluate_setting(setting, NAME, 0.25, WEIGHT) == pytest.approx(0.25)
    assert evaluate_setting(setting, "model.norm.weight", 0.75, WEIGHT) == pytest.approx(3.0)
    assert evaluate_setting([C([True, False], "mlp")], NAME, 0.4, NORMALIZE) is True
    assert evaluate_setting([C([True, False], "mlp")], NAME, 1.0, NORMALIZE) is False


def test_filter_value_coerced_and_type_checked():
    assert evaluate_setting([C("true", "mlp")], NAME, 0.0, NORMALIZE) is True
    with pytest.raises(ValueError):
        evaluate_setting([C("abc", "mlp")], NAME, 0.0, WEIGHT)


# ----------------------------------------------------------------------------------------------------------------------
# resolve: precedence, defaults, required
# ----------------------------------------------------------------------------------------------------------------------


def test_resolve_first_scope_setting_the_value_wins():
    source, slice_, global_ = {"weight": 0.1}, {"weight": 0.2}, {"weight": 0.3}
    assert resolve(WEIGHT, [source, slice_, global_], NAME, 0.0) == 0.1
    assert resolve(WEIGHT, [None, slice_, global_], NAME, 0.0) == 0.2
    assert resolve(WEIGHT, [{}, {"density": 0.5}, global_], NAME, 0.0) == 0.3


def test_resolve_scopes_can_be_any_iterable():
    scopes = iter([None, {"weight": [0, 1]}, {"weight": 5}])
    assert resolve(WEIGHT, scopes, NAME, 0.5) == 0.5


def test_resolve_filter_list_matching_nothing_falls_through_to_next_scope():
    source = {"weight": [C(0.1, "self_attn")]}
    slice_ = {"weight": [C(0.2, "embed")]}
    global_ = {"weight": [C(0.3, "mlp"), C(0.4)]}
    assert resolve(WEIGHT, [source, slice_, global_], NAME, 0.0) == 0.3
    assert resolve(WEIGHT, [source, slice_, global_], "model.embed_tokens.weight", 0.0) == 0.2
    assert resolve(WEIGHT, [source, slice_, global_], "model.layers.0.self_attn.k_proj.weight", 0.0) == 0.1
    assert resolve(WEIGHT, [source, slice_, global_], "lm_head.weight", 0.0) == 0.4


def test_resolve_filter_falls_through_to_default():
    assert resolve(DENSITY, [{"density": [C(0.5, "self_attn")]}], NAME, 0.0) == 1.0
    assert resolve(NORMALIZE, [{"normalize": [C(False, "self_attn")]}], NAME, 0.0) is True


def test_resolve_falsy_values_are_values_not_misses():
    # 0 and False set by a higher scope must win (only None / no match falls through)
    assert resolve(WEIGHT, [{"weight": 0}, {"weight": 1}], NAME, 0.0) == 0.0
    assert resolve(NORMALIZE, [{"normalize": False}, {"normalize": True}], NAME, 0.0) is False
    assert resolve(NORMALIZE, [{"normalize": [C(False, "mlp")]}, {"normalize": True}], NAME, 0.0) is False


def test_resolve_gradient_uses_t():
    scopes = [{"density": [0.2, 0.8]}]
    assert resolve(DENSITY, scopes, NAME, 0.0) == pytest.approx(0.2)
    assert resolve(DENSITY, scopes, NAME, 0.5) == pytest.approx(0.5)
    assert resolve(DENSITY, scopes, NAME, 1.0) == pytest.approx(0.8)


def test_resolve_default_when_unset():
    assert resolve(DENSITY, [None, {}, {"weight": 1}], NAME, 0.0) == 1.0
    assert resolve(NORMALIZE, [], NAME, 0.0) is True
    assert resolve(Param("scale", float, "input", None), [{}], NAME, 0.0) is None


def test_resolve_required_missing_raises_key_error():
    with pytest.raises(KeyError, match="weight"):
        resolve(WEIGHT, [None, {}, {"density": 0.5}], NAME, 0.0)
    with pytest.raises(KeyError, match="flag"):
        resolve(FLAG, [{"flag": [C(True, "self_attn")]}], NAME, 0.0)


def test_resolve_wrong_type_raises_value_error():
    with pytest.raises(ValueError):
        resolve(WEIGHT, [{"weight": "heavy"}], NAME, 0.0)
    with pytest.raises(ValueError):
        resolve(NORMALIZE, [{"normalize": 3}], NAME, 0.0)
    # a wrong type in a higher scope is an error even though a lower scope has a good value
    with pytest.raises(ValueError):
        resolve(WEIGHT, [{"weight": "heavy"}, {"weight": 1.0}], NAME, 0.0)


def test_resolve_returns_coerced_types():
    assert type(resolve(WEIGHT, [{"weight": 2}], NAME, 0.0)) is float
    assert resolve(NORMALIZE, [{"normalize": "false"}], NAME, 0.0) is False
