"""Run a recipe: edits -> (per batch) R-SFT -> merge -> export -> evaluation, each stage cached in the run directory.

The model stays in memory for training; what moves between stages are small delta checkpoints holding only the
trained tensors. Merges read the base overlaid with a delta, so a 70B recipe that trains a few layers never writes a
second full model until the final export.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..core.errors import MergeEditError
from ..core.units import parse_size
from ..core.yaml_source import YamlDocument
from ..editing.datasets import load_edits
from ..editing.forward import training_forward
from ..editing.prompts import PromptFormat
from ..editing.records import EditRecord
from ..editing.rsft import TrainingExample, TrainSettings, agree_precision, max_steps, train_edits
from ..editing.trainable import select_trainable
from ..io.integrity import add_to_manifest
from ..io.model_source import ModelSource, open_local, overlay
from ..merging.merge import MergeOptions, write_merge
from ..merging.plan import build_plan
from ..merging.schema import MergeConfig
from .adapter_stage import adapter_stage
from .checks import (
    check_compile,
    check_drift_texts,
    check_layers,
    check_merge_auto,
    check_recipe_merge,
    check_retain,
    check_run_location,
    examples_for,
    expand_rsft,
    prompt_format,
)
from .checks import merge_doc as _merge_doc
from .distributed import Distributed
from .evaluation_stage import DriftSetup
from .recipe import DEFAULT_TRAINABLE, Recipe, load_recipe
from .run_dir import RunDir, stable_hash

DELTA_FILE = "model.safetensors"


# -- stage names: the runner, `mergeedit plan` and the sweep name stages only through these ---------------------------
def rsft_stage_name(batch: int) -> str:
    return f"rsft-{batch:03d}"


def merge_stage_name(batch: int) -> str:
    return f"merge-{batch:03d}"


def curve_stage_name(batch: int) -> str:
    return f"curve-{batch:03d}"


def curve_stage_batches(recipe: Recipe, batches: int) -> list[int]:
    """The batches (0-based) after which the curve scores the edits so far in a stage `curve-NNN`: every
    `eval.curve_every`-th batch but the last, whose point is read from the final evaluation (the same model)."""
    every = recipe.eval.curve_every if recipe.eval.enabled else None
    return [b for b in range(batches - 1) if (b + 1) % every == 0] if every else []


ANCHORED_MERGE = "merge"
LAYER_PROBE = "layer-probe"  # `rsft.layers: auto`: the probe's scores and the chosen window
ANCHORED_MERGE_AUTO = "merge-auto"  # `merge: {auto: ...}` of the anchored strategy: every candidate scored, one kept
AUTO_SCRATCH = "merge-auto-scratch"  # RUN/.merge-auto-scratch-*: a candidate's merged delta while it is scored (removed after)


def merge_auto_stage_name(batch: int) -> str:
    return f"merge-auto-{batch:03d}"


def stage_names(recipe: Recipe, batches: int, prefix: str = "") -> list[str]:
    """Every stage a run of `recipe` over `batches` sequential batches goes through, in order."""
    ev = recipe.eval
    names = ([f"{prefix}pre-eval"] if ev.enabled else []) + (["pre-drift"] if ev.enabled and ev.drift else [])
    names += [LAYER_PROBE] if recipe.rsft.layers_auto is not None else []
    auto = recipe.merge is not None and recipe.merge.auto is not None
    for b in range(batches):
        names.append(rsft_stage_name(b))
        if recipe.merge is not None and recipe.sequential.strategy == "chained":
            names += [merge_auto_stage_name(b)] if auto else []
            names.append(merge_stage_name(b))
    if recipe.merge is not None and recipe.sequential.strategy == "anchored":
        names += [ANCHORED_MERGE_AUTO] if auto else []
        names.append(ANCHORED_MERGE)
    for b in curve_stage_batches(recipe, batches):  # an anchored run first merges the batches so far
        names += ([f"curve-{merge_stage_name(b)}"] if recipe.merge is not None and recipe.sequential.strategy == "anchored" else []) + [curve_stage_name(b)]
    return names + ["export"] + (["adapter"] if recipe.output.adapter else []) + (["eval"] if ev.enabled else [])


def is_evaluation_stage(name: str) -> bool:
    """Stages that score models (reference outputs, drift reference, curve points, the final evaluation)."""
    return name.endswith("pre-eval") or name in ("pre-drift", "eval") or name.startswith("curve-")


def evaluation_share(result: "RunResult") -> tuple[float, float]:
    """(seconds spent in evaluation stages run this time, their share of the run's wall time)."""
    seconds = sum(p["seconds"] for name, p in result.stage_profile.items() if is_evaluation_stage(name))
    return seconds, (seconds / result.seconds if result.seconds > 0 else 0.0)


def outside_stages(result: "RunResult") -> float:
    """Seconds of the run's wall time outside every stage: loading the model and tokenizing the edits, the retain
    KL's base side and the null space's moments (computed once, before any stage), and the bookkeeping between stages."""
    return max(result.seconds - sum(p["seconds"] for p in result.stage_profile.values()), 0.0)


def load_delta(model, delta: ModelSource) -> None:
    """Overwrite the model's trained tensors with a delta checkpoint's (the other tensors are untouched)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in delta.files:
        tensors.update(load_file(f))
    model.load_state_dict(tensors, strict=False)


class Reporter(Protocol):
    def stage(self, name: str, cached: bool, detail: str = "") -> None: ...
    def training(self, learned: int, total: int, loss: float, steps: int) -> None: ...
    def training_done(self) -> None: ...
    def merging(self, tensors_done: int, tensors_total: int) -> None: ...


class SilentReporter:
    def stage(self, name, cached, detail=""):
        pass

    def training(self, learned, total, loss, steps):
        pass

    def training_done(self):
        pass

    def merging(self, done, total):
        pass


@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    edits: int
    batches: int
    train_reports: list[dict]
    metrics: Optional[dict]
    pre_metrics: Optional[dict]
    examples: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stages_cached: list[str] = field(default_factory=list)
    stages_run: list[str] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stage_profile: dict = field(default_factory=dict)  # stage -> {"seconds", "peak_rss"} for the stages run
    ledger: list[dict] = field(default_factory=list)  # the run's ledger.jsonl batch entries (pipeline.ledger)
    layer_choice: Optional[dict] = None  # `rsft.layers: auto`: the probe's window and scores (stage layer-probe)
    merge_choices: list[dict] = field(default_factory=list)  # `merge: {auto}`: per merge, every candidate and the choice


@dataclass
class Session:
    """What every stage of a run shares once the base model is loaded (built by `RecipeRun.open_session`)."""

    run: RunDir
    records: list[EditRecord]
    base_folder: Path
    base_source: ModelSource
    base_key: dict
    trainable: list[str]
    settings: TrainSettings
    model: object
    tokenizer: object
    named: dict
    device: torch.device
    fmt: PromptFormat
    examples_by_case: dict[str, list[TrainingExample]]
    initial: dict[str, torch.Tensor]
    forward: object = None  # the training forward, with its frozen-prefix cache (kept across sequential batches)
    layer_choice: Optional[dict] = None  # `rsft.layers: auto`: the layer-probe stage's result
    retain: object = None  # a RetainKL against the original unedited model: rsft.retain's term, and merge.auto's locality probe (weight 0 when only that); None: neither
    retain_key: Optional[str] = None  # hash of the retain texts and settings (part of every R-SFT stage's key)
    null_space: object = None  # `rsft.null_space`: a NullSpaceProjector from the unedited model's retain activations


@dataclass
class Trained:
    """The R-SFT stages of a run: each batch's delta and stage id, and (chained) the model after each batch."""

    rsft_deltas: list[ModelSource] = field(default_factory=list)
    rsft_ids: list[str] = field(default_factory=list)
    checkpoints: list[tuple[str, ModelSource]] = field(default_factory=list)
    current_delta: Optional[ModelSource] = None
    upstream: str = ""


# -- recipe-derived settings ------------------------------------------------------------------------------------------
def train_settings(recipe: Recipe) -> tuple[TrainSettings, list[str], Optional[tuple[int, int]]]:
    """The loop's settings and the trainable patterns (each method's defaults are already in the recipe: METHOD_DEFAULTS)."""
    r = recipe.rsft
    s = TrainSettings(r.lr, r.weight_decay, r.optimizer, r.batch_size, r.max_epochs, r.max_steps_per_batch, r.loss_threshold, r.seed, r.schedule, r.sit_out_learned)
    patterns = r.trainable or DEFAULT_TRAINABLE
    layers = r.layer_range  # None for `layers: auto` (the probe narrows the trainable set in open_session)
    if r.method in ("locft-bf", "ft-m") and not r.trainable:
        patterns = [r"mlp\.(down_proj|c_proj)\.weight$"]
    if r.method == "ft-l" and not r.trainable:
        patterns = [r"layers\.\d+\..*(proj|fc|attn)\w*\.weight$"]
    return s, patterns, layers


def check_merge_refs(config: MergeConfig, doc: YamlDocument) -> None:
    for ref in config.referenced_models():
        if ref not in ("base", "rsft"):
            raise MergeEditError(f"{doc.where(('merge',))}: model reference '{ref}' is unknown; a recipe's merge may refer to `base` and `rsft`")
    if "rsft" not in config.referenced_models():
        raise MergeEditError(f"{doc.where(('merge',))}: the merge never uses `rsft`, so the edits would be discarded; add a model `rsft`")


def probe_layer_window(recipe: Recipe, model, tokenizer, records: list[EditRecord], examples_by_case: dict, trainable: list[str]) -> dict:
    """`rsft.layers: auto` on the unedited `model`: the training examples of the run's first `examples` edits, the
    per-layer gradient norm of their answer loss over `trainable` and the best window (editing.localize). The one
    computation `run` (stage layer-probe) and `mergeedit plan` make."""
    from ..editing.localize import choose_layers

    auto = recipe.rsft.layers_auto
    probed = records[: auto.examples] if auto.examples else records
    examples = [ex for r in probed for ex in examples_by_case[r.case_id]]
    pairs = [(ex.prompt_ids, ex.answer_ids) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # the gradient training follows: masked to `rsft.update_positions` as the steps are
    choice = choose_layers(model, pairs, trainable, width=auto.auto, pad_id=pad, max_examples=None, score=auto.score, positions=[ex.update_positions for ex in examples])
    return {**choice.to_json(), "edits": len(probed), "describe": choice.describe() + f" of the first {len(probed)} edit(s)"}


def auto_merge_in_ledger(entries: list[dict], choices: list[dict], config: Optional[MergeConfig], batches: int, strategy: str) -> list[dict]:
    """`merge: {auto}`: each batch's ledger entry records the merge actually made (the chosen parameters) and the
    choice (its stage, parameters, scores, floor); an anchored run's one choice covers every batch."""
    if not choices or config is None:
        return entries
    from .checks import expand_rsft
    from .grid import apply_point

    by_batch = {c.get("batch"): c for c in choices}
    for e in entries:
        choice = by_batch.get(e.get("batch"), by_batch.get(None))
        if choice is None or not e.get("merge"):
            continue
        chosen = apply_point(config, choice["params"], "merge.auto")
        e["merge"]["config"] = (expand_rsft(chosen, batches) if strategy == "anchored" else chosen).model_dump(mode="json")
        e["merge"]["auto"] = {k: choice[k] for k in ("stage", "params", "scores", "met_floor", "floor")}
    return entries


def replay_records(batches: list[list[EditRecord]], b: int, share: float, seed: int) -> list[EditRecord]:
    """The earlier batches' edits trained again with batch `b`: all of them (share 1), or a seeded share."""
    earlier = [r for batch in batches[:b] for r in batch]
    if share <= 0 or not earlier:
        return []
    if share >= 1:
        return earlier
    count = max(1, round(share * len(earlier)))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
    chosen = sorted(torch.randperm(len(earlier), generator=gen)[:count].tolist())
    return [earlier[i] for i in chosen]


# -- the run ---------------------------------------------------------------------------------------------------------
class RecipeRun:
    def __init__(self, recipe_path: Path, force: list[str] | None = None, reporter: Reporter | None = None) -> None:
        self.recipe_path = Path(recipe_path)
        self.recipe, self.doc = load_recipe(self.recipe_path)
        self.recipe_dir = self.recipe_path.resolve().parent
        out = self.recipe.output.dir
        root = ((self.recipe_dir / out) if out else (self.recipe_dir / "runs" / self.recipe_path.stem)).resolve()
        self.force = force or []
        self.reporter = reporter or SilentReporter()
        self.root = root
        self.merge_config = self.recipe.merge
        self.merge_auto = None  # `merge: {auto: ...}`: the chooser's section (MergeAuto)
        if self.merge_config is not None:
            self.merge_auto = self.merge_config.auto
            self.merge_config = self.merge_config.plain()
            check_merge_refs(self.merge_config, self.doc)
        if self.merge_config is None and self.recipe.sequential.strategy == "anchored":
            raise MergeEditError(f"{self.doc.where(('sequential', 'strategy'))}: the anchored strategy merges batches together and needs a `merge:` section")

    # records and batches ------------------------------------------------------------------------------------------
    def load_records(self) -> list[EditRecord]:
        d = self.recipe.dataset
        path = Path(d.path)
        if not path.is_absolute():
            path = self.recipe_dir / path
        records = load_edits(path, d.format, fields=d.fields, limit=d.limit, start=d.start, select=d.select)
        # Answers are scored as prompt + " " + answer: a stored leading space (19 ZsRE targets have one) would double it.
        return [replace(r, target=r.target.strip()) for r in records]

    def batches(self, records: list[EditRecord]) -> list[list[EditRecord]]:
        size = self.recipe.sequential.batch_size or len(records)
        return [records[i : i + size] for i in range(0, len(records), size)]

    # main ---------------------------------------------------------------------------------------------------------
    def open_session(self) -> Session:
        """Records, base model, trainable tensors and tokenized edits: what every stage needs (no stage runs here)."""
        from ..models.loading import load_model_and_tokenizer, pick_device, resolve_base_folder

        recipe = self.recipe
        records = self.load_records()
        dist = self.dist = Distributed()
        base_folder = resolve_base_folder(recipe.model.base, self.recipe_dir, recipe.model.dtype)
        check_run_location(self.root, self.doc, [base_folder])
        check_drift_texts(recipe, self.doc, self.recipe_dir)
        check_compile(recipe, self.doc)
        base_source = open_local(recipe.model.base, base_folder)
        settings, patterns, layers = train_settings(recipe)
        check_layers(recipe, self.doc, base_source)
        if recipe.rsft.method == "locft-bf" and layers is None and recipe.rsft.layers_auto is None:
            from ..io.architecture import layer_count

            n = layer_count(base_source)
            layer = min(max(round(0.2 * n), 0), max(n - 1, 0))
            layers = (layer, layer + 1)
        trainable = select_trainable(list(base_source.tensors), patterns, layers, self.doc.where(("rsft", "trainable")))
        check_recipe_merge(self.merge_config, self.doc, base_source, trainable, len(self.batches(records)), recipe.sequential.strategy == "anchored")
        check_merge_auto(recipe, self.doc, base_source, trainable, len(self.batches(records)), smallest=min(map(len, self.batches(records)), default=0) if recipe.sequential.strategy == "chained" else len(records))
        retain_texts = check_retain(recipe, self.doc, self.recipe_dir)
        device = dist.device(pick_device(recipe.model.device))
        if recipe.rsft.precision == "auto":
            agree_precision(device, dist.collective)
        model, tokenizer = load_model_and_tokenizer(base_folder, recipe.model.dtype, device, recipe.model.trust_remote_code)
        if recipe.rsft.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        named = dict(model.named_parameters())
        missing = [n for n in trainable if n not in named]
        if missing:
            raise MergeEditError(f"{self.doc.where(('rsft', 'trainable'))}: '{missing[0]}' is in the checkpoint but not a trainable parameter of the loaded model (a tied or buffer tensor?); narrow the pattern")
        fmt = prompt_format(recipe, self.doc, tokenizer)
        where = self.doc.where(("dataset",))
        # Tokenized once, up front: a target that tokenizes to nothing fails here, before any training.
        examples_by_case: dict[str, list[TrainingExample]] = {}
        for ex in examples_for(records, tokenizer, fmt, recipe.rsft.train_rephrases, where, system_prompt=fmt.system_prompt, eos=recipe.rsft.eos, update_positions=recipe.rsft.update_positions):
            examples_by_case.setdefault(ex.case_id, []).append(ex)
        run = RunDir(self.root, self.force, self.reporter, dist)  # only now: an error above leaves no run folder behind
        base_key = {"base": recipe.model.base, "dtype": recipe.model.dtype, "files": [(f.name, f.stat().st_size) for f in base_source.files], "version": __version__}
        layer_choice = None
        if recipe.rsft.layers_auto is not None:  # before the training forward: it depends on the trained set
            layer_choice = self.layer_probe(run, base_key, model, tokenizer, records, examples_by_case, fmt, trainable)
            trainable = select_trainable(list(base_source.tensors), patterns, tuple(layer_choice["window"]), self.doc.where(("rsft", "layers")))
        # the base's trained tensors, to start every anchored batch from (only the anchored strategy needs the copy)
        initial = {n: named[n].detach().to("cpu", copy=True) for n in trainable} if recipe.sequential.strategy == "anchored" else {}
        forward = training_forward(model, trainable)
        retain, retain_batches, retain_key = self.build_retain(retain_texts, model, tokenizer, device, max_steps(settings, len(records))) if retain_texts is not None else (None, None, None)
        null_space = None
        if recipe.rsft.null_space is not None:
            from ..editing.null_space import NullSpaceProjector

            # from the unedited model, in float32 (its activations' second moments in float64); every train report holds describe()
            null_space = NullSpaceProjector.build(model, trainable, retain_batches, recipe.rsft.null_space.energy, source=retain_texts.source)
        return Session(
            run, records, base_folder, base_source, base_key, trainable, settings, model, tokenizer, named, device, fmt, examples_by_case, initial, forward,
            layer_choice=layer_choice, retain=retain, retain_key=retain_key, null_space=null_space,
        )

    def layer_probe(self, run: RunDir, base_key: dict, model, tokenizer, records: list[EditRecord], examples_by_case: dict, fmt, trainable: list[str]) -> dict:
        """`rsft.layers: auto`: stage `layer-probe`, run once per run on the UNEDITED model over the first
        `examples` edits: the per-layer gradient norm of their answer loss over `trainable` (every layer's matching
        tensors), and the best window of `auto` layers (editing.localize). Every sequential batch trains that window, so
        all deltas, merges, the ledger and the adapter cover one tensor set."""
        auto = self.recipe.rsft.layers_auto
        probed = records[: auto.examples] if auto.examples else records
        inputs = {"base": base_key, "records": stable_hash([r.__dict__ for r in probed]), "format": fmt.describe(), "trainable": trainable, "auto": auto.model_dump(), "system_prompt": self.recipe.dataset.system_prompt, "eos": self.recipe.rsft.eos,
                  "update_positions": self.recipe.rsft.update_positions}

        def compute() -> dict:
            return probe_layer_window(self.recipe, model, tokenizer, records, examples_by_case, trainable)

        _, out = run.produce_json(LAYER_PROBE, inputs, compute, detail=f"{len(probed)} edits, width {auto.auto}")
        return out

    def build_retain(self, texts, model, tokenizer, device: torch.device, steps: int):
        """`rsft.retain`: the base side of the KL term, from the ORIGINAL unedited model (before any batch trains), under
        the autocast the steps use; every batch (chained or anchored) is held to the same base. Built only when something
        reads the base's distributions (the KL term with weight > 0, `merge: {auto}`'s locality probe); the null space
        alone reads only the padded batches, which need no forward. Under several processes each mini-batch's base side
        is computed per process share (`RetainKL.from_groups(parts=...)`), so the KL is 0 before the first step. Step s
        of a training call reads mini-batch s mod count, and no call takes more than `steps` steps (editing.rsft.max_steps
        over every edit), so only the first `steps` mini-batches get a base side unless `merge: {auto}` reads them all:
        the same KL at every step, for less of a forward on a short run. Returns (RetainKL or None, every padded batch,
        key)."""
        from ..editing.retain import RetainKL, retain_groups
        from ..editing.rsft import pick_precision
        from .recipe import RetainSection

        r = self.recipe.rsft.retain or RetainSection(weight=0.0)  # weight 0: only merge.auto's locality probe or the null space
        precision = self.recipe.rsft.precision
        if precision == "auto":
            precision = pick_precision(device)[0]
        system_prompt = self.recipe.dataset.system_prompt  # the chat lines in the form the edits train in
        key = stable_hash([texts.texts, r.model_dump(), precision] + ([texts.chat] if texts.chat else []) + ([system_prompt] if texts.chat and system_prompt is not None else []))
        groups = retain_groups(tokenizer, texts, batch_size=r.batch_size, max_tokens=r.max_tokens, device=device, system_prompt=system_prompt)  # tokenized and padded once
        batches = [batch for batch, _, _ in groups]
        auto = self.recipe.merge is not None and self.recipe.merge.auto is not None
        if r.weight <= 0 and not auto:
            return None, batches, key
        half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            kl = RetainKL.from_groups(model, groups, weight=r.weight, top_k=r.top_k, source=texts.source, max_groups=None if auto else steps,
                                      parts=self.dist.world_size)  # each process's share in its steps' shape
        return kl, batches, key

    def pre_edit_stages(self, s: Session, records: list[EditRecord], result: RunResult, prefix: str = "") -> tuple[Optional[dict], Optional[DriftSetup]]:
        """The unedited model's outputs: locality reference tokens and scores (stage `{prefix}pre-eval`), and the drift
        reference (stage `pre-drift`, shared by every record subset)."""
        recipe = self.recipe
        if not recipe.eval.enabled:
            return None, None
        from .evaluation_stage import drift_reference_stage, pre_edit_outputs

        inputs = {"base": s.base_key, "records": stable_hash([r.__dict__ for r in records]), "format": s.fmt.describe(), "eval": self.eval_key(), "references": ["locality", "locality_chat"]}
        _, pre = s.run.produce_json(f"{prefix}pre-eval", inputs, lambda: pre_edit_outputs(s.model, s.tokenizer, records, s.fmt, recipe.eval), shared=True)
        result.pre_metrics = pre.get("metrics")
        drift = None
        if recipe.eval.drift:
            drift = drift_reference_stage(s.run, s.base_key, s.model, s.tokenizer, recipe.eval, self.recipe_dir, result)
            if drift is not None:
                result.pre_metrics = {**(result.pre_metrics or {}), **drift.reference_metrics()}
        return pre, drift

    def train_batches(
        self, s: Session, result: RunResult, merge: bool = True, batches: Optional[list[list[EditRecord]]] = None, renamed_from: Optional[int] = None, prefix: str = "",
        on_checkpoint: Optional[Callable[[int, Trained], None]] = None,
    ) -> Trained:
        """R-SFT per batch (chained: merged back after each batch unless `merge` is False); every stage cached.
        `batches` replaces the recipe's (a revert's remaining batches); stages from batch `renamed_from` on get `prefix`.
        `on_checkpoint(b, trained)` is called (chained) once batch b's model is made and loaded."""
        recipe = self.recipe
        strategy = recipe.sequential.strategy
        named = s.named
        upstream = stable_hash(s.base_key)
        current_delta: Optional[ModelSource] = None  # chained: base + this delta is the current model
        trained = Trained()
        batches = self.batches(s.records) if batches is None else batches

        def named_stage(name: str, b: int) -> str:
            return prefix + name if renamed_from is not None and b >= renamed_from else name

        def replayed(b: int) -> list[EditRecord]:
            return replay_records(batches, b, recipe.rsft.replay, recipe.rsft.seed) if strategy == "chained" else []

        for b, batch in enumerate(batches):
            if strategy == "anchored":
                s.model.load_state_dict(s.initial, strict=False)

            def train(batch=batch, b=b):
                examples = [ex for r in batch for ex in s.examples_by_case[r.case_id]]
                examples += [ex for r in replayed(b) for ex in s.examples_by_case[r.case_id]]
                report = train_edits(
                    s.model, examples, s.trainable, s.settings, pad_id=s.tokenizer.pad_token_id, device=s.device,
                    progress=self.reporter.training, precision=recipe.rsft.precision, collective=self.dist.collective,
                    forward=s.forward, retain=s.retain, project=s.null_space, fresh=[r.case_id for r in batch],
                    compiled=str(recipe.rsft.compile).lower(),
                )
                self.reporter.training_done()
                return report

            def write_delta(tmp: Path, report) -> None:
                save_file({n: named[n].detach().to("cpu").contiguous() for n in s.trainable}, tmp / DELTA_FILE, metadata={"format": "pt"})
                (tmp / "train_report.json").write_text(json.dumps(report.to_json(), indent=2))

            inputs = {"upstream": upstream if strategy == "chained" else stable_hash(s.base_key), "rsft": recipe.rsft.model_dump(), "records": stable_hash([r.__dict__ for r in batch]), "format": s.fmt.describe(), "trainable": s.trainable, "system_prompt": recipe.dataset.system_prompt}
            if s.retain_key is not None and ((s.retain is not None and s.retain.weight > 0) or s.null_space is not None):
                inputs["retain"] = s.retain_key
            detail = f"{len(batch)} edits, {sum(named[n].numel() for n in s.trainable):,} trainable parameters"
            rsft_stage = s.run.produce(named_stage(rsft_stage_name(b), b), inputs, write_delta, compute=train, detail=detail)
            result.train_reports.append(json.loads((rsft_stage.path / "train_report.json").read_text()))
            rsft_delta = open_local(f"rsft.{b}", rsft_stage.path)
            trained.rsft_deltas.append(rsft_delta)
            trained.rsft_ids.append(rsft_stage.output_id)
            upstream = rsft_stage.output_id
            if strategy == "chained":
                if merge and self.merge_config is not None:
                    current_ref = overlay(s.base_source, current_delta, "base") if current_delta else s.base_source
                    sources = {"base": current_ref, "rsft": overlay(s.base_source, rsft_delta, "rsft")}
                    config = self.merge_config
                    if self.merge_auto is not None:
                        merge_sources = sources

                        def candidate(cfg, tmp, merge_sources=merge_sources):
                            self.merge_into(tmp, cfg, merge_sources, set(s.trainable))

                        config = self.merge_point(s, result, named_stage(merge_auto_stage_name(b), b), batch, upstream, candidate, batch_index=b + 1)
                    inputs = {"upstream": upstream, "merge": config.model_dump()}
                    merge_stage = self._merge_delta(s.run, named_stage(merge_stage_name(b), b), inputs, config, sources, set(s.trainable))
                    current_delta = open_local("merged", merge_stage.path)
                    upstream = merge_stage.output_id
                else:
                    current_delta = rsft_delta
                load_delta(s.model, current_delta)
                trained.checkpoints.append((upstream, current_delta))
                if on_checkpoint is not None:
                    on_checkpoint(b, trained)
        trained.current_delta, trained.upstream = current_delta, upstream
        return trained

    def merge_point(self, s: Session, result: RunResult, name: str, records: list[EditRecord], upstream: str, candidate, batch_index: Optional[int] = None) -> MergeConfig:
        """`merge: {auto: ...}`: stage `name` merges every candidate (`candidate(config, tmp)` writes its merged delta to
        the temporary folder `tmp`, removed once scored: a full delta per candidate would fill the disk), scores its
        reliability on the seeded validation split of `records` and its locality on the retain set against the unedited
        model (never the evaluation's locality probes), and keeps the best reliability whose locality meets the floor (pipeline.auto_merge). Its result.json holds every candidate's
        scores and the choice; returns the merge with the chosen parameters."""
        from .auto_merge import auto_validation, choose_merge, describe_choice
        from .checks import AUTO_RELIABILITY
        from .evaluation_stage import post_edit_evaluation
        from .grid import apply_point

        auto = self.merge_auto
        where = self.doc.where(("merge", "auto"))
        val = auto_validation(records, auto)
        needs_generation = any(k.endswith("_em") for k in (auto.reliability, auto.locality))
        cfg = self.recipe.eval.model_copy(update={"generation": needs_generation})
        # no "pre" input: the candidates are scored without the pre-edit reference (see score below)
        inputs = {"upstream": upstream, "merge": self.merge_config.model_dump(), "auto": auto.model_dump(), "eval": cfg.model_dump(exclude={"curve_every"}), "validation": [r.case_id for r in val], "retain": s.retain_key}

        def compute() -> dict:
            def score(config, point) -> dict:
                s.run.root.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=s.run.root, prefix=f".{AUTO_SCRATCH}-") as tmp:
                    candidate(config, Path(tmp))
                    load_delta(s.model, open_local("candidate", Path(tmp)))
                # no pre-edit reference: the evaluation's locality probes are neither scored nor read here
                scored = post_edit_evaluation(s.model, s.tokenizer, val, s.fmt, cfg, None, None)
                return {**{k: scored["metrics"].get(k, {}).get("value") for k in AUTO_RELIABILITY}, **s.retain.agreement(s.model)}

            choice = choose_merge(self.merge_config, auto, score, where=where)
            return {**choice.to_json(), "validation": [r.case_id for r in val], "config": choice.config.model_dump(mode="json")}

        _, chosen = s.run.produce_json(name, inputs, compute, detail=f"{len(auto.candidates)} parameter(s), scored on {len(val)} edit(s)")
        entry = {"stage": name, **({"batch": batch_index} if batch_index is not None else {}), **chosen}
        result.merge_choices.append(entry)
        result.notes.append(describe_choice(entry))
        return apply_point(self.merge_config, chosen["params"], where)

    def anchored_merge(self, s: Session, deltas: list[ModelSource], ids: list[str], config: MergeConfig, name: str) -> tuple[ModelSource, str]:
        """Task vectors of `deltas` (each trained from the base) merged into the base by `config`; a cached stage."""
        sources = self.anchored_sources(s, deltas)
        stage = self._merge_delta(s.run, name, {"rsft": ids, "merge": config.model_dump()}, expand_rsft(config, len(deltas)), sources, set(s.trainable))
        return open_local("merged", stage.path), stage.output_id

    def anchored_sources(self, s: Session, deltas: list[ModelSource]) -> dict[str, ModelSource]:
        """The anchored merge's inputs: the base, and the base overlaid with each batch's delta (rsft.0, rsft.1, ...)."""
        sources = {"base": s.base_source, **{f"rsft.{i}": overlay(s.base_source, d, f"rsft.{i}") for i, d in enumerate(deltas)}}
        if len(deltas) == 1:
            sources["rsft"] = sources.pop("rsft.0")
        return sources

    def curve(self, s: Session, trained: Trained, pre: Optional[dict], drift: Optional[DriftSetup], ends: list[int], config: Optional[MergeConfig] = None) -> list[dict]:
        """Teacher-forced scores (and drift) on the edits so far, after every `eval.curve_every` batches, each a stage
        `curve-NNN`; the last batch's point is not among them: `run` reads it from the final evaluation, which scores
        the same model on every edit. Chained runs score each point as soon as its batch is merged (`train_batches`'
        `on_checkpoint`): here they are read back from their stages; anchored runs merge the batches so far first.
        `ends`: the edits so far after each batch."""
        points = []
        for b in curve_stage_batches(self.recipe, len(ends)):
            if self.recipe.sequential.strategy == "anchored":
                delta, delta_id = self.anchored_merge(s, trained.rsft_deltas[: b + 1], trained.rsft_ids[: b + 1], config or self.merge_config, f"curve-{merge_stage_name(b)}")
            else:
                delta_id, delta = trained.checkpoints[b]
            points.append(self.curve_point(s, b, ends[b], delta, delta_id, pre, drift))
        return points

    def curve_point(self, s: Session, b: int, done: int, delta: ModelSource, delta_id: str, pre: Optional[dict], drift: Optional[DriftSetup]) -> dict:
        """Stage curve-NNN: the first `done` edits scored on the model `delta` (after batch `b`), with drift; cached."""
        from .evaluation_stage import curve_point

        so_far = s.records[:done]
        inputs = {"upstream": delta_id, "pre": s.run.output_id("pre-eval"), "drift": drift.stage_id if drift else None, "eval": self.eval_key(), "edits": done}

        def compute() -> dict:
            load_delta(s.model, delta)
            return curve_point(s.model, s.tokenizer, so_far, s.fmt, self.recipe.eval, pre, drift, batch=b + 1)

        return s.run.produce_json(curve_stage_name(b), inputs, compute, shared=True)[1]

    def run(self) -> RunResult:
        started = time.perf_counter()
        recipe = self.recipe
        s = self.open_session()
        records, model, tokenizer, fmt, run = s.records, s.model, s.tokenizer, s.fmt, s.run
        result = self.new_result(s)

        # 1. pre-edit reference outputs (locality is post-vs-pre; drift is against the unedited model)
        pre, drift = self.pre_edit_stages(s, records, result)

        # 2. R-SFT (+ merge) per batch; the anchored strategy merges every batch's task vector at the end. A chained
        # run scores its curve points as their batches end, so a run stopped early keeps the points it reached.
        ends = list(itertools.accumulate(map(len, self.batches(records))))  # edits so far after each batch

        scored = set(curve_stage_batches(recipe, len(ends)))

        def score_checkpoint(b: int, trained: Trained) -> None:
            if b in scored:
                delta_id, delta = trained.checkpoints[b]
                self.curve_point(s, b, ends[b], delta, delta_id, pre, drift)

        trained = self.train_batches(s, result, on_checkpoint=score_checkpoint)
        if s.retain is not None and s.retain.weight > 0:
            kl = ", ".join(f"{r['retain']['kl'][0]:.4g} -> {r['retain']['kl'][-1]:.4g}" for r in result.train_reports if r.get("retain", {}).get("kl"))
            result.notes.append(f"retain: {s.retain.weight} x KL(unedited || current) on {s.retain.source}; KL at the first -> last step of each batch: {kl or 'no step'}")
        if s.null_space is not None:
            d = s.null_space.describe()
            result.notes.append(f"null space: every update kept off the top input directions holding {d['energy']} of {d['positions']} retain positions' "
                                f"activations; {d['free_share']:.1%} of the trained matrices' input directions left free")
        current_delta, upstream = trained.current_delta, trained.upstream
        config = self.merge_config  # anchored with merge.auto: the chosen point
        if recipe.sequential.strategy == "anchored":
            if self.merge_auto is not None:
                def candidate(cfg, tmp):
                    self.merge_into(tmp, expand_rsft(cfg, len(trained.rsft_deltas)), self.anchored_sources(s, trained.rsft_deltas), set(s.trainable))

                config = self.merge_point(s, result, ANCHORED_MERGE_AUTO, records, stable_hash(trained.rsft_ids), candidate)
            current_delta, upstream = self.anchored_merge(s, trained.rsft_deltas, trained.rsft_ids, config, ANCHORED_MERGE)
        curve = recipe.eval.enabled and recipe.eval.curve_every
        if curve:
            result.curve = self.curve(s, trained, pre, drift, ends, config=config if recipe.sequential.strategy == "anchored" else None)
        if current_delta is not None:
            load_delta(model, current_delta)

        # 3. export the edited model as a Hugging Face folder
        final_source = overlay(s.base_source, current_delta, "edited") if current_delta else s.base_source
        export_inputs = {"upstream": upstream, "dtype": recipe.model.dtype, "shard": recipe.output.shard_size}
        export = run.produce("export", export_inputs, lambda tmp: self._export(tmp, final_source, s.base_folder), detail=str(result.model_dir))
        adapter_stage(run, recipe, export, s.base_folder, self.root)  # output.adapter: RUN/adapter, a PEFT LoRA of the edits

        # 4. evaluate the final model against the pre-edit reference
        if recipe.eval.enabled:
            from .evaluation_stage import post_edit_evaluation

            inputs = {"upstream": export.output_id, "pre": run.output_id("pre-eval"), "drift": drift.stage_id if drift else None, "eval": self.eval_key()}
            _, post = run.produce_json("eval", inputs, lambda: post_edit_evaluation(model, tokenizer, records, fmt, recipe.eval, pre, drift), shared=True)
            result.metrics = post["metrics"]
            result.examples = post.get("examples", [])
            if curve:
                from ..evaluation.curves import write_curve
                from .evaluation_stage import final_curve_point

                result.curve.append(final_curve_point(post, batch=len(ends), edits=len(records)))
                result.notes += write_curve(result.curve, self.root)
        result.seconds = time.perf_counter() - started
        result.ledger = self.ledger_entries(s, result)
        self._publish(result, export)
        return result

    # helpers --------------------------------------------------------------------------------------------------------
    def ledger_entries(self, s: Session, result: RunResult) -> list[dict]:
        """The run's ledger: one entry per batch (records, recipe hash, delta sha256, merge used, metrics)."""
        from .ledger import batch_entries, read_ledger, tensors_sha256

        batches, strategy, config = self.batches(s.records), self.recipe.sequential.strategy, self.merge_config
        merges = [None if config is None else ANCHORED_MERGE if strategy == "anchored" else merge_stage_name(b) for b in range(len(batches))]
        used = None if config is None else (expand_rsft(config, len(batches)) if strategy == "anchored" else config).model_dump(mode="json")
        eval_file = s.run.root / "stages" / "eval" / "result.json"
        per_edit = json.loads(eval_file.read_text()).get("per_edit") if self.recipe.eval.enabled and eval_file.is_file() else None
        base = {"ref": self.recipe.model.base, "dtype": self.recipe.model.dtype, "trained_sha256": tensors_sha256(s.initial)}
        entries = batch_entries(
            run_root=self.root, recipe_path=self.recipe_path, strategy=strategy, base=base, batches=batches,
            rsft_stages=[rsft_stage_name(b) for b in range(len(batches))], merge_stages=merges, merge_config=used,
            train_reports=result.train_reports, per_edit=per_edit, previous=read_ledger(self.root, required=False),
        )
        return auto_merge_in_ledger(entries, result.merge_choices, self.merge_config, len(batches), strategy)

    def new_result(self, s: Session) -> RunResult:
        """The result of a run over this session; its stage lists are the run directory's own record."""
        result = RunResult(self.root, self.root / "model", len(s.records), len(self.batches(s.records)), [], None, None)
        if s.layer_choice is not None:
            result.layer_choice = s.layer_choice
            result.notes.append(s.layer_choice["describe"])
        result.stages_run, result.stages_cached = s.run.ran, s.run.reused
        result.stage_profile = s.run.profile
        return result

    def eval_key(self) -> dict:
        """The eval settings that change scores (how often the curve is sampled does not)."""
        return self.recipe.eval.model_dump(exclude={"curve_every"})

    def _merge_delta(self, run: RunDir, name: str, inputs: dict, config: MergeConfig, sources: dict[str, ModelSource], names: set[str]):
        """Stage `name`: merge only the trained tensors (every other tensor of the result is the base's, bit for bit)."""

        def write(tmp: Path) -> None:
            self.merge_into(tmp, config, sources, names)

        return run.produce(name, inputs, write, detail=f"{config.merge_method} of {len(sources) - 1} R-SFT model(s) into the base")

    def merge_into(self, tmp: Path, config: MergeConfig, sources: dict[str, ModelSource], names: set[str]) -> None:
        """Write the merge of the trained tensors `names` as tmp/model.safetensors (no stage: `merge_point`'s candidates)."""

        def opener(ref: str) -> ModelSource:
            if ref not in sources:
                raise MergeEditError(f"unknown model reference '{ref}' in the recipe's merge; use base or rsft")
            return sources[ref]

        plan = build_plan(config, _merge_doc(self.doc), opener=opener, only=names, out_dtype="float32")
        options = MergeOptions(overwrite=True, copy_tokenizer=False)
        if self.recipe.output.memory_budget:
            options.memory_budget = parse_size(self.recipe.output.memory_budget, "output.memory_budget")
        done = [0]

        def progress(t, nbytes):
            done[0] += 1
            self.reporter.merging(done[0], len(plan.tensors))

        write_merge(plan, tmp / "delta", options, progress=progress)
        (tmp / "delta" / DELTA_FILE).rename(tmp / DELTA_FILE)

    def _export(self, tmp: Path, source: ModelSource, base_folder: Path) -> None:
        """Stream base + delta into a sharded Hugging Face folder, with the base's config and tokenizer."""
        config = MergeConfig(merge_method="passthrough", models=[{"model": "edited"}], out_dtype=self.recipe.model.dtype)
        doc = YamlDocument(self.recipe_path, {}, {})
        plan = build_plan(config, doc, opener=lambda ref: source)
        plan.tokenizer_model = open_local("base", base_folder)
        plan.base_model = plan.tokenizer_model
        options = MergeOptions(overwrite=True, out_shard_size=parse_size(self.recipe.output.shard_size, "output.shard_size"), save_config=False)
        write_merge(plan, tmp / "model", options)

    def export_model(self, tmp: Path, source: ModelSource, base_folder: Path) -> None:
        """The export stage's writer, for other pipeline modules (a revert writes its model as a run does)."""
        self._export(tmp, source, base_folder)

    def _publish(self, result: RunResult, export) -> None:
        """Place the exported model at run_dir/model with its model card (recipe, edits, metrics, versions)."""
        from .model_card import write_model_card

        if not self.dist.is_main:
            return
        target = result.model_dir
        source = export.path / "model"
        if target.is_symlink() or target.exists():
            if target.is_symlink():
                target.unlink()
            else:
                import shutil

                shutil.rmtree(target)
        target.symlink_to(source.relative_to(target.parent), target_is_directory=True)
        write_model_card(source / "README.md", self.recipe, self.doc, result)
        add_to_manifest(source, "README.md")
        from .ledger import publish_run_ledger

        publish_run_ledger(self.root, source, result.ledger)
