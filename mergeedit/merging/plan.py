"""Turn a merge config into a plan: every output tensor, its inputs, its parameters and its dtypes.

Planning reads safetensors headers only. Every problem a user can fix (a missing model or tensor, a shape mismatch,
a missing parameter) is found here, before a byte is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..core.errors import MergeEditError
from ..core.yaml_source import YamlDocument, did_you_mean
from ..io import architecture as arch
from ..io.dtypes import compute_dtype_for, dtype_name, itemsize, parse_user_dtype
from ..io.lora import LowRankUpdate
from ..io.model_source import ModelSource, open_model
from ..io.safetensors_header import TensorInfo
from ..io.source_reader import RowMap, StoredTensor, row_bytes
from .chat_templates import resolve_chat_template
from .config import locate_model
from .methods import all_parameter_names, get_method
from .methods.passthrough import COPY
from .methods.seeded_random import derive_seed
from .methods.spec import MergeMethod, Param
from .parameters import resolve
from .schema import InputSlice, MergeConfig
from .tokenizer import VocabularyPlan, is_vocabulary_tensor, plan_vocabulary, tokenizer_setting


@dataclass(frozen=True)
class TensorSource:
    model: int  # index into MergePlan.models
    info: TensorInfo
    lora: Optional[LowRankUpdate] = None  # `model+adapter`: folded in as the tensor is read
    row_map: Optional[RowMap] = None  # tokenizer merge: output vocabulary row -> this input's row or fill

    @property
    def stored(self) -> StoredTensor:
        return StoredTensor(self.info, self.lora)

    @property
    def nbytes(self) -> int:
        """Bytes read for this input: its rows as the output lays them out."""
        if self.row_map is None:
            return self.info.nbytes
        return self.row_map.out_rows * row_bytes(self.info)


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    sources: list[TensorSource]
    base: Optional[int]  # index into sources
    method: MergeMethod
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    load_dtype: Optional[torch.dtype]  # inputs are cast to this on load (the config's `dtype`), else kept
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    seed: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def bytes_in(self) -> int:
        return sum(s.nbytes for s in self.sources)

    @property
    def bytes_out(self) -> int:
        return self.numel * itemsize(self.out_dtype)

    def bytes_per_element_in_flight(self) -> int:
        """Bytes held per output element while a chunk is read, merged (in cache-sized blocks) and written."""
        lora = sum(4 for s in self.sources if s.lora is not None)  # the float32 update B @ A folded in as rows are read
        return sum(s.info.bytes_per_element_to_read for s in self.sources) + lora + itemsize(self.out_dtype)


@dataclass
class MergePlan:
    config: MergeConfig
    doc: YamlDocument
    method: MergeMethod
    models: list[ModelSource]
    tensors: list[PlannedTensor]
    layers_out: int
    base_model: Optional[ModelSource]
    out_config: Optional[dict]
    tokenizer_model: Optional[ModelSource]
    warnings: list[str] = field(default_factory=list)
    output_tokenizer: Any = None  # tokenizer merge (tokenizer_source/tokenizer:): saved instead of copying files
    chat_template: Optional[str] = None  # written as chat_template.jinja

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)


@dataclass
class _Slice:
    """A normalized output slice: sources with layer ranges and where each came from in the YAML."""

    sources: list[InputSlice]
    source_paths: list[tuple]
    parameters: Optional[dict]
    base_ref: Optional[str]
    where: tuple


class Planner:
    def __init__(
        self,
        config: MergeConfig,
        doc: YamlDocument,
        *,
        random_seed: int = 0,
        out_dtype: Optional[str] = None,
        opener: Optional[Callable[[str], ModelSource]] = None,
        only: Optional[set[str]] = None,
        allow_pickle: bool = False,
        float32_compute: bool = False,
    ) -> None:
        """`opener` maps a model reference to its ModelSource; without one, references are paths or hub ids opened from
        disk (relative paths also tried beside the config), pickled folders only with `allow_pickle`."""
        self.config = config
        self.doc = doc
        self.random_seed = random_seed
        self.out_dtype_override = out_dtype
        self.float32_compute = float32_compute  # compute in float32 even where mergekit computes in bfloat16/float16
        self.opens_paths = opener is None
        self.opener = opener or partial(open_model, allow_pickle=allow_pickle)
        self.only = only  # restrict the output to these tensor names (R-SFT deltas: every other tensor is the base's)
        self.method = get_method(config.merge_method, doc.where(("merge_method",)))
        self.models: list[ModelSource] = []
        self._model_index: dict[str, int] = {}
        self.warnings: list[str] = []
        self.vocabulary: Optional[VocabularyPlan] = None  # set by plan() when a tokenizer merge is configured

    # -- models -------------------------------------------------------------------------------------------------
    def _resolve_ref(self, ref: str) -> str:
        """Relative paths are taken from the working directory, then from the config's folder (merging.config)."""
        if not self.opens_paths:
            return ref
        found = locate_model(ref, self.doc.path)
        return str(found) if found is not None else ref

    def open_models(self) -> None:
        """Every model the config names (a `tokenizer:` block's source is read as a tokenizer folder, not opened)."""
        paths: dict[str, tuple] = {}
        for ref, key in self.config.model_references():
            if key != ("tokenizer", "source"):
                paths.setdefault(ref, key)
        for ref, key in paths.items():
            self._open(ref, key)

    def _open(self, ref: str, path: tuple) -> None:
        """Open one referenced model; its errors are prefixed with where the config names it."""
        try:
            model = self.opener(self._resolve_ref(ref))
            arch.check_head(model)
        except MergeEditError as exc:
            raise MergeEditError(f"{self.doc.where(path)}: {exc}") from None
        model.ref = ref
        self._model_index[ref] = len(self.models)
        self.models.append(model)

    def model(self, ref: str) -> ModelSource:
        return self.models[self._model_index[ref]]

    # -- slices -------------------------------------------------------------------------------------------------
    def _normalized_slices(self) -> list[_Slice]:
        c = self.config
        if c.models:
            refs = [m.model for m in c.models]
            paths = [("models", i) for i in range(len(refs))]
            params = [m.parameters for m in c.models]
            if c.base_model and c.base_model not in refs:
                refs.append(c.base_model)
                paths.append(("base_model",))
                params.append(None)
            counts = {r: arch.layer_count(self.model(r)) for r in refs}
            if len(set(counts.values())) > 1:
                detail = ", ".join(f"{r}: {n}" for r, n in counts.items())
                raise MergeEditError(f"{self.doc.where(('models',))}: models have different layer counts ({detail}); use 'slices' with matching layer_range for each")
            n = next(iter(counts.values()))
            sources = [InputSlice.model_construct(model=r, layer_range=(0, n), parameters=p) for r, p in zip(refs, params)]
            return [_Slice(sources, paths, None, c.base_model, ("models",))]
        out = []
        for i, s in enumerate(c.slices):
            out.append(_Slice(list(s.sources), [("slices", i, "sources", j) for j in range(len(s.sources))], s.parameters, s.base_model or c.base_model, ("slices", i)))
            lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(lengths) > 1:
                raise MergeEditError(f"{self.doc.where(('slices', i, 'sources'))}: every source of a slice needs the same number of layers, got {sorted(lengths)}; fix the layer_range values")
            for j, src in enumerate(s.sources):
                have = arch.layer_count(self.model(src.model))
                if src.layer_range[1] > have:
                    raise MergeEditError(f"{self.doc.where(('slices', i, 'sources', j, 'layer_range'))}: layer_range {list(src.layer_range)} exceeds the {have} layers of '{src.model}'")
        return out

    # -- parameters ---------------------------------------------------------------------------------------------
    def _check_parameter_names(self) -> None:
        known = {p.name for p in self.method.params}
        everywhere = all_parameter_names()
        c = self.config
        scopes: list[tuple[tuple, Optional[dict]]] = [(("parameters",), c.parameters)]
        scopes += [(("models", i, "parameters"), m.parameters) for i, m in enumerate(c.models or [])]
        for i, s in enumerate(c.slices or []):
            scopes.append((("slices", i, "parameters"), s.parameters))
            scopes += [(("slices", i, "sources", j, "parameters"), src.parameters) for j, src in enumerate(s.sources)]
        for path, params in scopes:
            for key in params or {}:
                if key in known:
                    continue
                where = self.doc.where(path + (key,))
                if key in everywhere:
                    self.warnings.append(f"{where}: parameter '{key}' is not used by {self.method.name}; it is ignored")
                else:
                    raise MergeEditError(
                        f"{where}: unknown parameter '{key}' for {self.method.name}{did_you_mean(key, known)}; "
                        f"its parameters are: {', '.join(sorted(known)) or 'none'}"
                    )

    def _resolve(self, param: Param, scopes: list, tensor_name: str, t: float, who: str, scope_path: tuple) -> Any:
        try:
            return resolve(param, scopes, tensor_name, t)
        except KeyError:
            raise MergeEditError(
                f"{self.doc.where(scope_path)}: {self.method.name} needs parameter '{param.name}' for {who} (tensor {tensor_name}); "
                f"set it under that model's parameters or the global parameters"
            ) from None
        except ValueError as exc:
            raise MergeEditError(f"{self.doc.where(scope_path)}: parameter '{param.name}' for {who}: {exc}") from None

    # -- tensors ------------------------------------------------------------------------------------------------
    def _input_info(self, ref: str, name: str, out_name: str, path: tuple) -> TensorInfo:
        model = self.model(ref)
        info = model.tensors.get(name)
        if info is None and name == arch.TIED_HEAD:
            tied = arch.tied_embedding_name(model)
            info = model.tensors.get(tied) if tied else None
        if info is None:
            raise MergeEditError(
                f"{self.doc.where(path)}: model '{ref}' has no tensor '{name}' (needed for output '{out_name}'); "
                "the models must share an architecture, or use slices to pick matching layers"
            )
        return info

    def _plan_tensor(self, out_name: str, in_names: list[str], sl: _Slice, t: float) -> PlannedTensor:
        """One output tensor: its inputs checked against each other and the method, parameters resolved, dtypes chosen."""
        srcs = sl.sources
        infos = [self._input_info(s.model, n, out_name, p) for s, n, p in zip(srcs, in_names, sl.source_paths)]
        refs = [s.model for s in srcs]
        row_maps = self._row_maps(out_name, refs, infos, sl.base_ref)
        dtypes, floating = self._check_alike(out_name, refs, infos, row_maps)
        base = refs.index(sl.base_ref) if sl.base_ref in refs else None
        method = self.method
        paths = sl.source_paths
        if not floating:
            method = COPY  # integer/bool buffers: no arithmetic applies; keep the base's (or first) tensor
            keep = base if base is not None else 0
            infos, srcs, refs, paths, base = [infos[keep]], [srcs[keep]], [refs[keep]], [paths[keep]], 0
        else:
            self._check_inputs(method, sl, refs, base)
        shared, per_input = self._parameters(method, sl, srcs, infos, paths, base, out_name, t)
        load, compute, out = self._dtypes(method, dtypes, infos[base if base is not None else 0].torch_dtype)
        return PlannedTensor(
            name=out_name,
            shape=infos[0].shape if row_maps is None else (self.vocabulary.out_rows, *infos[0].shape[1:]),
            sources=[
                TensorSource(self._model_index[r], i, self.model(r).lora.get(i.name), (row_maps or {}).get((r, i.name))) for r, i in zip(refs, infos)
            ],
            base=base,
            method=method,
            shared=shared,
            per_input=per_input,
            load_dtype=load,
            compute_dtype=compute,
            out_dtype=out,
            seed=derive_seed(self.random_seed, out_name),
        )

    def _check_alike(self, out_name: str, refs: list[str], infos: list[TensorInfo], row_maps: Optional[dict]) -> tuple[set, bool]:
        """The inputs' dtypes and whether they are floating point, once their shapes and dtypes are known to agree."""
        shapes = {i.shape if row_maps is None else i.shape[1:] for i in infos}
        if len(shapes) > 1:
            detail = ", ".join(f"{r}: {list(i.shape)}" for r, i in zip(refs, infos))
            vocab_only = is_vocabulary_tensor(out_name) and len({i.shape[1:] for i in infos}) == 1
            hint = " (different vocabularies: set 'tokenizer_source: union' or 'base')" if vocab_only else ""
            raise MergeEditError(f"{self.doc.path}: tensor '{out_name}' has different shapes across models ({detail}){hint}; these models cannot be merged tensor by tensor")
        dtypes = {i.torch_dtype for i in infos}
        floats = {d.is_floating_point for d in dtypes}
        if len(floats) > 1 or (len(dtypes) > 1 and self.config.dtype is None):
            detail = ", ".join(f"{r}: {dtype_name(i.torch_dtype)}" for r, i in zip(refs, infos))
            raise MergeEditError(
                f"{self.doc.path}: tensor '{out_name}' has different dtypes across models ({detail}); "
                "set 'dtype: float32' (or bfloat16) in the config to choose the dtype they are merged in"
            )
        return dtypes, all(floats)

    def _check_inputs(self, method: MergeMethod, sl: _Slice, refs: list[str], base: Optional[int]) -> None:
        """The method's needs: a base model where it requires one, and its minimum and maximum number of inputs."""
        if method.base_model == "required" and base is None:
            raise MergeEditError(
                f"{self.doc.where(sl.where)}: {method.name} needs a base model among the inputs; "
                "set base_model (and list it as a source of every slice)"
            )
        if method.max_inputs is not None and len(refs) > method.max_inputs:
            raise MergeEditError(
                f"{self.doc.where(sl.where)}: {method.name} takes at most {method.max_inputs} input{'s' if method.max_inputs > 1 else ''} "
                f"per tensor but gets {len(refs)} "
                f"({', '.join(refs)}); "
                + (("give one source per slice" + (" and drop base_model" if sl.base_ref else "")) if method.max_inputs == 1
                   else f"list at most {method.max_inputs} models" + (", base_model included" if sl.base_ref else ""))
            )
        if len(refs) < method.min_inputs:
            raise MergeEditError(
                f"{self.doc.where(sl.where)}: {method.name} needs at least {method.min_inputs} inputs per tensor "
                f"(base model included) but gets {len(refs)} ({', '.join(refs)}); list more models"
            )

    def _parameters(self, method: MergeMethod, sl: _Slice, srcs, infos, paths, base: Optional[int], out_name: str, t: float) -> tuple[dict, list[dict]]:
        """(shared parameters, per-input parameters) of one tensor, resolved source > slice > global and checked."""
        shared = {
            p.name: self._resolve(p, [sl.parameters, self.config.parameters], out_name, t, "the merge", sl.where + ("parameters",))
            for p in method.params
            if p.scope == "shared"
        }
        per_input = []
        for k, (src, info, path) in enumerate(zip(srcs, infos, paths)):
            scopes = [src.parameters, sl.parameters, self.config.parameters]
            per_input.append({
                p.name: self._resolve(p, scopes, info.name, t, f"model '{src.model}'", path)
                for p in method.params
                if p.scope == "input" or (p.scope == "non_base" and k != base)
            })
        if method.check is not None:
            try:
                method.check(shared, per_input)
            except ValueError as exc:
                raise MergeEditError(f"{self.doc.where(sl.where)}: {method.name} on tensor '{out_name}': {exc}") from None
        return shared, per_input

    def _dtypes(self, method: MergeMethod, dtypes: set, stored: torch.dtype) -> tuple[Optional[torch.dtype], torch.dtype, torch.dtype]:
        """(load, compute, out) dtypes: a copied tensor keeps its stored dtype; merged ones load in the config's
        `dtype`, compute as io.dtypes.compute_dtype_for says and are saved in the output dtype."""
        if method is COPY:
            return None, stored, stored
        load = parse_user_dtype(self.config.dtype, self.doc.where(("dtype",))) if self.config.dtype else None
        compute = compute_dtype_for({load} if load else dtypes)
        if method.low_precision_compute and not self.float32_compute:
            compute = low_precision_compute_dtype({load} if load else dtypes) or compute
        return load, compute, self._out_dtype() or load or stored

    def _row_maps(self, out_name: str, refs: list[str], infos: list[TensorInfo], base_ref: Optional[str]) -> Optional[dict]:
        """(model, tensor) -> its row map, for vocabulary tensors when a tokenizer merge is configured; else None."""
        if self.vocabulary is None or not is_vocabulary_tensor(out_name):
            return None
        stored = [StoredTensor(i, self.model(r).lora.get(i.name)) for r, i in zip(refs, infos)]
        maps = self.vocabulary.row_maps(out_name, refs, stored, base_ref)
        return {(r, i.name): m for r, i, m in zip(refs, infos, maps)}

    def _out_dtype(self) -> Optional[torch.dtype]:
        if self.out_dtype_override:
            return parse_user_dtype(self.out_dtype_override, "--dtype")
        if self.config.out_dtype:
            return parse_user_dtype(self.config.out_dtype, self.doc.where(("out_dtype",)))
        return None

    def plan(self) -> MergePlan:
        self._check_parameter_names()
        self.open_models()
        self.vocabulary = self._plan_vocabulary()
        slices = self._normalized_slices()
        first, last = slices[0], slices[-1]
        template_ref = first.base_ref if first.base_ref in [s.model for s in first.sources] else first.sources[0].model
        pre, post = arch.split_roles(self.model(template_ref))
        tensors: list[PlannedTensor] = []
        for name in pre:
            tensors.append(self._plan_tensor(name, [name] * len(first.sources), first, 0.0))
        layer_out = 0
        for sl in slices:
            start0 = sl.sources[0].layer_range[0]
            n = sl.sources[0].layer_range[1] - start0
            lead = self.model(sl.sources[0].model)
            for i in range(n):
                t = i / (n - 1) if n > 1 else 1.0
                for lname in arch.layer_tensors(lead, start0 + i):
                    in_names = [lname.at(src.layer_range[0] + i) for src in sl.sources]
                    tensors.append(self._plan_tensor(lname.at(layer_out), in_names, sl, t))
                layer_out += 1
        for name in post:
            tensors.append(self._plan_tensor(name, [name] * len(last.sources), last, 0.0))
        if self.only is not None:
            tensors = [t for t in tensors if t.name in self.only]
        base = self.model(self.config.base_model) if self.config.base_model else None
        config_source = base or self.model(template_ref)
        self._check_config_source(config_source, "base_model" if base is not None else None)
        return MergePlan(
            config=self.config,
            doc=self.doc,
            method=self.method,
            models=self.models,
            tensors=tensors,
            layers_out=layer_out,
            base_model=base,
            out_config=self._with_vocab_size(self._out_config(config_source, tensors, layer_out)),
            tokenizer_model=self._tokenizer_model(base or self.model(template_ref)),
            warnings=self.warnings,
            output_tokenizer=self.vocabulary.tokenizer if self.vocabulary else None,
            chat_template=self._chat_template(),
        )

    # -- tokenizer (tokenizer_merge.py, chat_templates.py) -----------------------------------------------------------
    def _input_refs(self) -> list[str]:
        """The input models, base (or first model) first: the order tokenizers are merged in."""
        refs = self.config.referenced_models()
        first = self.config.base_model or refs[0]
        return [first] + [r for r in refs if r != first]

    def _plan_vocabulary(self) -> Optional[VocabularyPlan]:
        setting = tokenizer_setting(self.config)
        if setting is None:
            return None
        refs = self._input_refs()
        folders = {r: self.model(r).folder for r in refs}
        if setting not in ("base", "union"):
            folders[setting] = self.model(setting).folder if setting in self._model_index else Path(self._resolve_ref(setting))
        configs = {r: self.model(r).config for r in refs}
        return plan_vocabulary(self.config, refs, folders, configs, self.doc.where, self.warnings)

    def _with_vocab_size(self, cfg: Optional[dict]) -> Optional[dict]:
        if self.vocabulary is not None:
            self.vocabulary.update_config(cfg)
        return cfg

    def _chat_template(self) -> Optional[str]:
        setting = self.config.chat_template
        if not setting:
            return None
        refs = self._input_refs()
        where = self.doc.where(("chat_template",))
        tokenizer_files = [self.model(refs[0]).folder / f for f in ("tokenizer_config.json", "tokenizer.json")]
        if self.vocabulary is None and not any(f.is_file() for f in tokenizer_files):
            self.warnings.append(f"{where}: '{refs[0]}' has no tokenizer files to copy, so the chat template will not be saved")
        return resolve_chat_template(setting, [self.model(r).folder for r in refs], where)

    def _check_config_source(self, source: ModelSource, key: Optional[str]) -> None:
        """The output's config.json is the base's (or the first model's): a model folder without one would give an
        output no loader can read, so it is refused; a bare .safetensors file has none by nature and only warns."""
        if source.config is not None:
            return
        where = self.doc.where((key,) if key else ("models",))
        if source.path.is_dir():
            raise MergeEditError(
                f"{where}: '{source.ref}' ({source.folder}) has no config.json, so the merged folder could not be loaded; "
                "add the model's config.json to that folder"
            )
        self.warnings.append(f"{where}: '{source.ref}' is a bare .safetensors file, so the output has no config.json; add one before loading it")

    def _out_config(self, source: ModelSource, tensors: list[PlannedTensor], layers: int) -> Optional[dict]:
        if source.config is None:
            return None
        cfg = dict(source.config)
        dtypes = [t.out_dtype for t in tensors if t.out_dtype.is_floating_point]
        if dtypes:
            name = dtype_name(max(set(dtypes), key=dtypes.count))
            cfg["dtype"] = name
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = name
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg and layers:
                cfg[key] = layers
        return cfg

    def _tokenizer_model(self, default: ModelSource) -> Optional[ModelSource]:
        c = self.config
        source = c.tokenizer.source if c.tokenizer else c.tokenizer_source
        if source in (None, "base", "union") or self.vocabulary is not None:
            return default
        if source not in self._model_index:
            self._open(source, ("tokenizer", "source"))
        return self.model(source)


def low_precision_compute_dtype(dtypes: set[torch.dtype]) -> Optional[torch.dtype]:
    """bfloat16 or float16 when every input is in it (after the config's `dtype` cast): what mergekit computes in for a
    method that does not upcast (torch's promotion of the inputs' dtypes); None otherwise."""
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.bfloat16, torch.float16):
        return next(iter(dtypes))
    return None


def build_plan(config: MergeConfig, doc: YamlDocument, **options: Any) -> MergePlan:
    return Planner(config, doc, **options).plan()
