"""The merge configuration: mergekit's YAML schema, validated with pydantic, errors pointing at file and line."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..core.errors import MergeEditError
from ..core.yaml_source import YamlDocument, did_you_mean

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionalParameter(_Strict):
    """One entry of a filter list: the first entry whose `filter` occurs in the tensor name wins."""

    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[ScalarOrGradient, ConditionalParameter, list[ConditionalParameter]]
Parameters = Optional[dict[str, ParameterSetting]]


class InputModel(_Strict):
    model: str
    parameters: Parameters = None


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None
    parameters: Parameters = None

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v: list[InputSlice]) -> list[InputSlice]:
        if not v:
            raise ValueError("a slice needs at least one source")
        return v


class OutputModule(_Strict):
    """One entry of `modules:`: a module's own models or slices, and parameters between the slices' and the global ones."""

    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Parameters = None

    @model_validator(mode="after")
    def _one_layout(self) -> "OutputModule":
        if bool(self.models) == bool(self.slices):
            raise ValueError("a module needs exactly one of 'models' or 'slices'")
        return self


class ModelTokenEmbedding(_Strict):
    """A token's embedding taken from a given row of a model: by its id there, or by a token of that model's vocabulary."""

    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = None
    token: Optional[str] = None

    @model_validator(mode="after")
    def _one_of(self) -> "ModelTokenEmbedding":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token_id' or 'token'")
        return self


class ZeroEmbedding(_Strict):
    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """Where one output token's embedding comes from; `force` uses it even for models that have the token."""

    source: Union[ModelTokenEmbedding, ZeroEmbedding, str, None] = None
    force: bool = False


class TokenizerBlock(_Strict):
    source: Union[Literal["union", "base"], str] = "union"  # mergekit's default
    tokens: Optional[dict[str, TokenEmbedding]] = None
    pad_to_multiple_of: Optional[int] = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {v}")
        return v


class MergeConfig(_Strict):
    """mergekit's MergeConfiguration, field for field."""

    merge_method: str
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    modules: Optional[dict[str, OutputModule]] = None
    base_model: Optional[str] = None
    parameters: Parameters = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerBlock] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None  # mergekit-mega documents use it; harmless label

    @model_validator(mode="after")
    def _one_layout(self) -> "MergeConfig":
        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("exactly one of 'models', 'slices' or 'modules' must be given" + (f" (found {', '.join(given)})" if given else ""))
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer' block, not both")
        return self

    def model_references(self, tokenizers: bool = True) -> list[tuple[str, tuple]]:
        """Every model reference of the config with the key path that names it, in config order (base_model, models,
        slices; then, with `tokenizers`, tokenizer_source and tokenizer.source unless they are `base` or `union`).
        The one walker: the planner, the merge graph and the recipe checks all read references through it."""
        refs: list[tuple[str, tuple]] = []
        if self.base_model:
            refs.append((self.base_model, ("base_model",)))
        for i, m in enumerate(self.models or []):
            refs.append((m.model, ("models", i, "model")))
        for i, s in enumerate(self.slices or []):
            refs += [(src.model, ("slices", i, "sources", j, "model")) for j, src in enumerate(s.sources)]
            if s.base_model:
                refs.append((s.base_model, ("slices", i, "base_model")))
        if tokenizers:
            if self.tokenizer_source not in (None, "base", "union"):
                refs.append((self.tokenizer_source, ("tokenizer_source",)))
            if self.tokenizer is not None and self.tokenizer.source not in (None, "base", "union"):
                refs.append((self.tokenizer.source, ("tokenizer", "source")))
        return refs

    def referenced_models(self) -> list[str]:
        """The distinct models whose tensors the merge reads (tokenizer sources aside), in config order."""
        return list(dict.fromkeys(ref for ref, _ in self.model_references(tokenizers=False)))


def validation_error_line(doc: YamlDocument, exc: ValidationError, model: type[BaseModel]) -> str:
    errors = exc.errors()
    # A misspelt key shows up twice: as an unknown key and as a missing one; the unknown key is the useful line.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("list", "dict", "str", "int", "float", "bool"))))
    where = doc.where(loc)
    if err["type"] == "extra_forbidden":
        key = loc[-1]
        parent = _model_at(model, loc[:-1])
        hint = did_you_mean(key, parent.model_fields) if parent else ""
        return f"{where}: unknown key '{key}'{hint}; remove it or fix its spelling"
    if err["type"] == "missing":
        return f"{where}: required key '{loc[-1]}' is missing; add it"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns keys at `loc` (for did-you-mean suggestions)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = _inner_model(field.annotation)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def parse_merge_config(doc: YamlDocument) -> MergeConfig:
    try:
        config = MergeConfig.model_validate(doc.data)
    except ValidationError as exc:
        raise MergeEditError(validation_error_line(doc, exc, MergeConfig)) from None
    return config
