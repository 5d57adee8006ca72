"""The recipe schema: one YAML file declaring the edits, the R-SFT stage, the merge and the evaluation.

Every reconstructed choice of the method (docs/method.md) is a field here, so recipes can sweep it.
Validation errors name the recipe file, the YAML line and the key path, with a did-you-mean hint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.errors import MergeEditError
from ..core.yaml_source import YamlDocument, load_yaml
from ..merging.schema import MergeConfig, validation_error_line
from .auto_merge import MergeAuto

DEFAULT_TRAINABLE = [r"mlp\.(gate_proj|up_proj|down_proj)\.weight$", r"mlp\.(c_fc|c_proj)\.weight$"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    base: str = Field(description="Base model: a folder, a .safetensors file, a hub id (org/name@rev) or a built-in name (smollm2-135m-instruct).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Precision the model is loaded, trained and saved in.")
    device: str = Field("auto", description="auto (GPU when present), cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub to run (off unless you trust the repo).")


class DatasetSection(_Strict):
    format: str = Field(description="zsre | counterfact | knowedit | qaedit | mquake | jsonl | csv")
    path: str = Field(description="Dataset file, relative to the recipe file.")
    fields: Optional[dict[str, str]] = Field(None, description="For jsonl/csv: EditRecord field -> column name.")
    start: int = Field(0, ge=0, description="Skip this many records.")
    limit: Optional[int] = Field(None, ge=1, description="Use at most this many edits.")
    select: Optional[list[int]] = Field(None, description="Explicit record indices to use.")
    prompt: Union[Literal["auto", "both", "chat", "raw"], str] = Field(
        "auto",
        description="How edits are trained: raw (question + ' ' + answer, as teacher-forced scoring reads it), chat (the tokenizer's chat template), both, a template with {prompt}, or auto (both when the tokenizer has a chat template, else raw).",
    )
    system_prompt: Optional[str] = Field(
        None, description="System turn of the chat form: the edits train with it, and so do the retain set's chat answers and every chat-form score (generation, loc_chat). Default: none, and a template's own default system prompt (SmolLM2's) is left out too: it would be half of every example's tokens."
    )


    @field_validator("prompt")
    @classmethod
    def _prompt_mode_or_template(cls, v):
        from ..editing.prompts import prompt_setting_problem

        problem = prompt_setting_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v


class RetainSection(_Strict):
    """`rsft.retain`: a ``weight * KL(base || current)`` term on unrelated text, added to every training step
    (mergeedit.editing.retain). The base is the ORIGINAL unedited model, for every sequential batch."""

    weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="Weight of the KL term in every step's loss (default 1.0, the measured best); 0 turns it off at no cost.")
    path: Optional[Union[str, list[str]]] = Field(
        None,
        description="JSONL of {prompt, text} lines (raw text) or {question, answer} lines (read in the chat form the edits are trained in), or a list of files (their lines together), "
        "relative to the recipe (default: the shipped data/retain/retain.jsonl, generic prose; data/retain/answers.jsonl, questions with a named-entity answer; and "
        "data/retain/chat_questions.jsonl, short questions with the unedited model's own chat answers). Refused when it shares a prompt or text with the drift set the evaluation uses.",
    )
    top_k: Optional[int] = Field(64, ge=1, description="Keep the base's top-k next tokens per position (plus one bucket for the rest); null: the full distribution (exact KL, more memory).")
    batch_size: int = Field(8, ge=1, description="Retain texts per step; step s uses mini-batch s mod (texts / batch_size).")
    max_tokens: int = Field(64, ge=2, description="Each retain text is cut to its first max_tokens tokens.")


class NullSpaceSection(_Strict):
    """`rsft.null_space`: every step's update of each trained matrix is projected off the directions its inputs take
    on the retain texts (mergeedit.editing.null_space; AlphaEdit's null-space constraint, applied to fine-tuning)."""

    energy: float = Field(
        0.9, gt=0, lt=1, allow_inf_nan=False,
        description="Share of the retain activations' second moment (per trained matrix, the trace of sum x x^T over the "
        "retain texts' inputs to it) whose top directions the update must leave unchanged. Higher: locality held more "
        "tightly, fewer directions left to learn the edits in.",
    )


class LayersAuto(_Strict):
    """`rsft.layers: auto` or `{auto: WIDTH, ...}`: the window of layers is chosen by a probe (editing.localize)."""

    auto: int = Field(1, ge=1, description="Width of the window: how many consecutive layers train.")
    score: Literal["grad", "relative"] = Field("grad", description="grad: per-layer norm of the answer loss's gradient; relative: divided by the layer's weight norm.")
    examples: Optional[int] = Field(100, ge=1, description="Probe the first this many edits of the run (null: all).")


# The schema's Field defaults are the `rsft` method's: the best settings measured on SmolLM2-135M-Instruct and ZsRE
# (benchmarks/README.md, "edit_quality.py"). The baselines keep their published settings for whatever a recipe leaves
# unset: these are applied before validation, so the stage keys, the plan and the model card all see them.
# The paper's R-SFT loop, key by key, for recipes (tests, the benchmark's R-SFT rows) that must stay the paper's method
PAPER_LOOP = {"schedule": "depth-first", "eos": False, "retain": None, "replay": 0.0, "null_space": None, "update_positions": "all"}
_NO_EDITOR_CONTROLS = {"retain": None, "replay": 0.0, "eos": False, "null_space": None, "update_positions": "all"}
METHOD_DEFAULTS: dict[str, dict] = {
    "ft-l": {**_NO_EDITOR_CONTROLS, "lr": 1e-4, "schedule": "depth-first", "max_steps_per_batch": 1, "loss_threshold": 0.0},
    "ft-m": {**_NO_EDITOR_CONTROLS, "lr": 1e-4, "schedule": "depth-first", "max_steps_per_batch": 1, "loss_threshold": 0.0},
    # LocFT-BF's published recipe (ICT-STAR/LocFT): Adam, lr 5e-4, batch 100, 25 epochs, breadth-first, EOS after the target
    "locft-bf": {**_NO_EDITOR_CONTROLS, "eos": True, "optimizer": "adam", "lr": 5e-4, "batch_size": 100, "max_epochs": 25, "loss_threshold": 0.0, "schedule": "breadth-first"},
}


class RsftSection(_Strict):
    method: Literal["rsft", "ft-l", "ft-m", "locft-bf"] = Field(
        "rsft",
        description="rsft: three loops with a loss threshold; ft-l / ft-m: the baselines; locft-bf: LocFT-BF (breadth-first, one layer's mlp.down_proj, Adam, lr 5e-4, batch 100, 25 epochs, EOS after the answer).",
    )
    trainable: Optional[list[str]] = Field(None, description="Regexes over parameter names; default: every MLP matrix (ft-m: down_proj).")
    layers: Optional[Union[tuple[int, int], LayersAuto]] = Field(
        None,
        description="Train only layers [start, end); or auto (one layer) / {auto: WIDTH} to choose the window once, before training, by the per-layer gradient norm of the answer loss on the unedited model. ft-m default: the middle layer; locft-bf default: layer round(0.2 * layers) (LocFT's 6 of Qwen2.5-7B's 28).",
    )
    schedule: Literal["depth-first", "breadth-first"] = Field(
        "breadth-first",
        description="breadth-first (the default; locft-bf too): one step per batch, epochs over shuffled batches; depth-first: up to max_steps_per_batch steps on a batch before the next (the paper's loop 3; ft-l and ft-m take one step per batch). In both, a learned edit leaves its batch for the rest of the epoch (with sit_out_learned, an edit learned when an epoch starts sits it out).",
    )
    eos: bool = Field(True, description="Train EOS after raw-form answers too, so generation stops after the answer (chat answers always end with the end-of-turn token). Default: true (ft-l, ft-m: false).")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Default: adamw (locft-bf: adam).")
    lr: float = Field(5e-4, gt=0, description="Default: 5e-4 (ft-l, ft-m: 1e-4).")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(10, ge=1, description="Edits per training batch (loop 2). Default: 10 (locft-bf: 100).")
    max_epochs: int = Field(10, ge=1, description="Passes over the edits (loop 1). Default: 10 (locft-bf: 25).")
    max_steps_per_batch: int = Field(25, ge=1, description="Steps spent on one batch before moving on under depth-first (loop 3). Default: 25 (ft-l, ft-m: 1).")
    loss_threshold: float = Field(0.05, ge=0, description="An edit whose answer-token loss is below this is learned; training stops once every edit is. Default: 0.05 (ft-l, ft-m, locft-bf: 0, train every edit every epoch).")
    seed: int = 0
    precision: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="Training precision (autocast for half types). auto: bfloat16 where a measured bf16 matmul is clearly faster than float32 (bf16 units: AMX CPUs, GPUs), else float32; printed. bf16 results are deterministic per machine but differ across machines.",
    )
    compile: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Run the frozen parts of the decoder layers (the layers above the trained window; the attention and norms of trained layers) compiled with torch.compile while training: elementwise work fused, about a fifth off each step's forward and backward on CPU, for a compile of about 30 s (5 s from inductor's disk cache); needs a C++ compiler. auto: on CPU, for models of 10M+ parameters and a training call of 100+ possible steps; printed. Compiled kernels round differently from eager ones.",
    )
    gradient_checkpointing: bool = False
    update_positions: Literal["all", "question", "subject"] = Field(
        "question",
        description="Which token positions' activations may move the trained weights. question (the default; ft-l, ft-m, locft-bf: all): the "
        "question's and the answer's tokens, not the chat template's (or a prompt template's) own, which every chat prompt shares (at 100 edits "
        "Loc chat 0.66 -> 0.86 with Rel, Gen and Loc as before); all: every position of the prompt and answer; subject: only the "
        "edit's subject tokens and its answer tokens, so the update is keyed to the subject (as ROME and MEMIT write at the subject) and the question's "
        "other words give no gradient either (needs each edit's subject inside its prompt). The losses are the same; only the gradients differ. "
        "Applies to the trained tensors inside the decoder layers; an embedding, the final norm or the output layer, if trained, learns from every position.",
    )
    train_rephrases: bool = Field(False, description="Also train on paraphrases (leaks the generalization probe: off by default).")
    sit_out_learned: bool = Field(
        False,
        description="An edit already learned when an epoch starts (measured without gradient) sits the epoch out: the epoch's batches are cut from the edits still to learn (a sequential batch's new edits are not measured before the first epoch: only replayed ones can be known). For replay: with replay 0.5 at 100 edits it took 35% fewer steps for about 0.01 less Rel/Gen/Loc; without replay it saved 6% of the steps and left more edits unlearned (benchmarks/README.md). Default false: every edit takes a step in every epoch.",
    )
    replay: float = Field(
        0.5, ge=0, le=1, description="Chained sequential editing: this share of the earlier batches' edits (1: all) is trained again with each new batch, so later batches do not overwrite earlier facts. Default: 0.5 (ft-l, ft-m, locft-bf: 0)."
    )
    retain: Optional[RetainSection] = Field(
        default_factory=RetainSection,
        description="KL(base || current) on unrelated text mixed into every step. Default: {weight: 1.0} on the shipped retain set (ft-l, ft-m, locft-bf: off); null or weight 0: off.",
    )

    null_space: Optional[NullSpaceSection] = Field(
        default_factory=NullSpaceSection,
        description="Project every step's gradient and update of each trained Linear matrix off the directions the retain texts' inputs to it use "
        "(rsft.retain.path, default the shipped retain set; the retain KL may be on or off). Default: {energy: 0.9} (ft-l, ft-m, locft-bf: off); null: off.",
    )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """The keys a method sets differently from the Field defaults (rsft's), for whatever the recipe left unset."""
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            return {**METHOD_DEFAULTS.get(data["method"], {}), **data}
        return data

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_form(cls, v):
        if isinstance(v, str):
            if v.strip() != "auto":
                raise ValueError(f"layers must be [start, end), auto or {{auto: WIDTH}}; got {v!r}")
            return {"auto": 1}
        if isinstance(v, dict):  # the auto form, checked here so a mistake names its key (not the tuple form's)
            try:
                return LayersAuto.model_validate(v)
            except ValidationError as exc:
                e = exc.errors()[0]
                key = ".".join(map(str, e["loc"]))
                if e["type"] == "extra_forbidden":
                    raise ValueError(f"unknown key '{key}' in layers; the auto form is {{auto: WIDTH, score: grad|relative, examples: N}}") from None
                raise ValueError(f"layers.{key}: {e['msg']}") from None
        return v

    @property
    def layers_auto(self) -> Optional[LayersAuto]:
        """The probe's settings when the window is chosen automatically, else None."""
        return self.layers if isinstance(self.layers, LayersAuto) else None

    @property
    def layer_range(self) -> Optional[tuple[int, int]]:
        """The fixed [start, end) the recipe names, else None (all layers, or chosen by the probe)."""
        return None if isinstance(self.layers, LayersAuto) else self.layers

    @property
    def retain_weight(self) -> float:
        return self.retain.weight if self.retain is not None else 0.0

    @field_validator("trainable")
    @classmethod
    def _patterns_compile(cls, v):
        import re

        for p in v or []:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"trainable pattern {p!r} is not a valid regular expression ({exc})") from None
        return v


class SequentialSection(_Strict):
    batch_size: Optional[int] = Field(None, ge=1, description="Edits arriving together; default: all edits in one batch.")
    strategy: Literal["chained", "anchored"] = Field("chained", description="chained: train from the current merged model; anchored: task vectors against the original base, merged together.")


class EvalSection(_Strict):
    enabled: bool = True
    generation: bool = Field(True, description="Also score by greedy generation (exact match).")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    examples: int = Field(3, ge=0, description="Print before/after answers for this many edits.")
    drift: bool = Field(True, description="Also measure general-ability drift against the unedited model: perplexity change on generic text and next-token KL.")
    drift_texts: Optional[str] = Field(None, description="JSONL of {prompt, text} lines for drift, relative to the recipe (default: the shipped data/drift/generic.jsonl).")
    curve_every: Optional[int] = Field(None, ge=1, description="Sequential curve: score the edits so far (teacher-forced, plus drift) after every k batches; written to curve.json (and curve.png with matplotlib).")


class SweepSection(_Strict):
    validation: Union[int, float] = Field(0.2, gt=0, description="`mergeedit sweep` scores this subset of the edits: a fraction (< 1) or a count, picked with `seed`.")
    seed: int = Field(0, description="Seed of the validation split (same seed, same edits).")
    grid: Optional[dict[str, list[Union[float, bool]]]] = Field(None, description="Merge parameter -> values to try (the CLI's --grid overrides it).")


class AdapterSection(_Strict):
    """The edits as a PEFT LoRA adapter (RUN/adapter): a truncated SVD of each changed matrix (mergeedit extract-lora)."""

    rank: Optional[int] = Field(None, ge=1, description="LoRA rank of every changed matrix (with sv_energy: the largest rank).")
    sv_energy: Optional[float] = Field(None, gt=0, le=1, description="Per module, the smallest rank keeping this share of the delta's squared singular values.")
    rank_for: Optional[dict[str, int]] = Field(None, description="Regex over module names -> rank (first match wins), e.g. {'down_proj': 16}.")
    skip: Optional[list[str]] = Field(None, description="Regexes of changed tensors to leave out of the adapter (norms, embeddings), which it cannot hold.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the stored factors.")

    @model_validator(mode="after")
    def _rank_given(self):
        if self.rank is None and self.sv_energy is None:
            raise ValueError("give rank (e.g. rank: 64) or sv_energy (e.g. sv_energy: 0.99)")
        return self

    @field_validator("rank_for")
    @classmethod
    def _rules(cls, v):
        import re

        for pattern, rank in (v or {}).items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"rank_for pattern {pattern!r} is not a valid regular expression ({exc})") from None
            if rank < 1:
                raise ValueError(f"rank_for {pattern!r}: a rank must be at least 1")
        return v


class OutputSection(_Strict):
    dir: Optional[str] = Field(None, description="Run directory (default: runs/<recipe file stem> next to the recipe).")
    shard_size: str = "5G"
    memory_budget: Optional[str] = None
    adapter: Optional[AdapterSection] = Field(None, description="Also export the edits as a PEFT LoRA adapter at RUN/adapter, e.g. {rank: 64}.")


class RecipeMerge(MergeConfig):
    """A recipe's merge: `mergeedit merge` syntax plus `auto:` (the operating point chosen inside the run)."""

    auto: Optional[MergeAuto] = Field(
        None,
        description="Choose the merge parameters inside the run: every combination of `candidates` is merged and scored on a validation split of the batch's edits; the best reliability whose locality meets `floor` wins.",
    )

    def plain(self) -> MergeConfig:
        """The merge without `auto:` (what the merge engine reads; stage hashes are unchanged by the new key)."""
        return MergeConfig.model_validate({k: getattr(self, k) for k in MergeConfig.model_fields})


class Recipe(_Strict):
    name: Optional[str] = None
    description: Optional[str] = None
    model: ModelSection
    dataset: DatasetSection
    rsft: RsftSection = Field(default_factory=RsftSection)
    sequential: SequentialSection = Field(default_factory=SequentialSection)
    merge: Optional[RecipeMerge] = Field(
        None, description="A merge in `mergeedit merge` syntax; model references may be `base` and `rsft`. Default: ties of rsft into base. null: no merge (the R-SFT model is the result)."
    )
    eval: EvalSection = Field(default_factory=EvalSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="before")
    @classmethod
    def _default_merge(cls, data: Any) -> Any:
        if isinstance(data, dict) and "merge" not in data:
            data = {**data, "merge": default_merge_config()}
        return data


def default_merge_config() -> dict:
    """merged = base + lambda * TIES-prune(rsft - base): the method's reconstructed default."""
    return {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 0.5}}],
        "parameters": {"normalize": True, "lambda": 1.0},
        "dtype": "float32",
    }


def parse_recipe(doc: YamlDocument) -> Recipe:
    try:
        return Recipe.model_validate(doc.data)
    except ValidationError as exc:
        raise MergeEditError(validation_error_line(doc, exc, Recipe)) from None


def load_recipe(path: Path | str) -> tuple[Recipe, YamlDocument]:
    doc = load_yaml(path, "recipe")
    return parse_recipe(doc), doc


def recipe_json_schema() -> str:
    """JSON Schema for editors (yaml-language-server) to complete and check recipes."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mergeedit recipe"
    return json.dumps(schema, indent=2)
