"""`mergeedit validate` and `mergeedit plan`: check a recipe and estimate its work without loading the model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..editing.trainable import select_trainable
from ..io.architecture import input_key
from ..io.dtypes import itemsize, parse_user_dtype
from ..io.model_source import open_local
from .checks import (
    check_compile,
    check_drift_texts,
    check_layers,
    check_merge_auto,
    check_recipe_merge,
    check_retain,
    check_run_location,
    examples_for,
    prompt_format,
)
from .runner import RecipeRun, probe_layer_window, stage_names, train_settings


@dataclass
class RecipePlan:
    recipe_path: Path
    edits: int
    batches: int
    strategy: str
    stages: list[str]
    base: str
    base_folder: str | None
    model_parameters: int | None
    model_bytes: int | None
    trainable_tensors: int | None
    trainable_parameters: int | None
    delta_bytes: int | None
    merge: str
    bytes_read: int | None
    bytes_written: int | None
    peak_memory: int | None
    notes: list[str] = field(default_factory=list)
    layer_choice: dict | None = None  # `rsft.layers: auto`: the probe's window and scores (plan loads the model for it)


def null_space_bytes(recipe, source, trainable: list[str]) -> int:
    """`rsft.null_space`'s memory, at most: per distinct input of the trained 2-D weights (io.architecture.input_key:
    gate/up share one, q/k/v another; an unknown name counts as its own), the smaller side of its eigenbasis
    (editing.null_space.Projection), ``in x r`` float32 with ``r <= in // 2``."""
    if recipe.rsft.null_space is None:
        return 0
    inputs = {}
    for name in trainable:
        shape = tuple(source.tensors[name].shape)
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        inputs[(input_key(name), shape[1])] = shape[1]
    return sum(4 * n * (n // 2) for n in inputs.values())


def _base_folder_if_available(run: RecipeRun) -> Path | None:
    """The base's folder when it can be found without converting or downloading anything."""
    from ..models import builtin as builtin_models
    from ..models.loading import resolve_base_folder

    ref = run.recipe.model.base
    if builtin_models.is_builtin(ref):
        cached = builtin_models.cached_folder(ref, dtype=run.recipe.model.dtype)
        return cached
    return resolve_base_folder(ref, run.recipe_dir, run.recipe.model.dtype)


def _new_key_notes(run: RecipeRun, retain) -> list[str]:
    """What `rsft.retain`, `rsft.null_space`, `rsft.replay` (where it does nothing) and `merge: {auto}` will do, in one line each."""
    recipe, notes = run.recipe, []
    if retain is not None and recipe.rsft.retain_weight > 0:
        r = recipe.rsft.retain
        notes.append(
            f"retain: {r.weight} x KL(base || current) in every step on {len(retain)} texts of {retain.source} "
            f"(top-{r.top_k or 'all'}, {r.batch_size} per step, {r.max_tokens} tokens each); the base is the unedited model for every batch"
        )
    if retain is not None and recipe.rsft.null_space is not None:
        notes.append(
            f"null space: every step's update of each trained Linear matrix is projected off the top directions holding {recipe.rsft.null_space.energy} "
            f"of its inputs' second moment on {len(retain)} texts of {retain.source} (measured on the unedited model)"
        )
    if recipe.rsft.replay > 0 and recipe.sequential.strategy == "anchored":
        notes.append(f"replay: {recipe.rsft.replay} does nothing under the anchored strategy: each batch trains from the base on its own edits "
                     "(replay trains earlier batches' edits again in chained runs); set rsft.replay: 0 to say so")
    if recipe.merge is not None and recipe.merge.auto is not None:
        a = recipe.merge.auto
        count = 1
        for values in a.candidates.values():
            count *= len(values)
        axes = " x ".join(f"{k} {v}" for k, v in a.candidates.items())
        per = "every batch" if recipe.sequential.strategy == "chained" else "the anchored merge"
        notes.append(f"merge auto: for {per}, {count} candidates ({axes}) scored on a validation split ({a.validation}, seed {a.seed}); the best {a.reliability} with {a.locality} >= {a.floor} is kept"
                     + (f" ({a.locality}: the unedited model's next token kept on {len(retain)} texts of {retain.source})" if retain is not None else ""))
    return notes


def plan_recipe(path: Path, probe: bool = True) -> RecipePlan:
    """Every check `run` makes before it trains (schema, dataset, run folder, merge method and parameters, layers,
    trainable patterns, tokenizer, chat template, targets), without loading the model's weights, except for
    `rsft.layers: auto` with `probe`: then the model is loaded and probed as `run` does, and the window is shown."""
    run = RecipeRun(path)
    recipe = run.recipe
    check_run_location(run.root, run.doc, [])
    records = run.load_records()
    check_drift_texts(recipe, run.doc, run.recipe_dir)
    check_compile(recipe, run.doc)
    retain = check_retain(recipe, run.doc, run.recipe_dir)
    smallest = min(map(len, run.batches(records)), default=0) if recipe.sequential.strategy == "chained" else len(records)
    check_merge_auto(recipe, run.doc, smallest=smallest)
    batches = run.batches(records)
    n = len(batches)
    stages = stage_names(recipe, n)
    plan = RecipePlan(
        recipe_path=path, edits=len(records), batches=n, strategy=recipe.sequential.strategy, stages=stages, base=recipe.model.base,
        base_folder=None, model_parameters=None, model_bytes=None, trainable_tensors=None, trainable_parameters=None, delta_bytes=None,
        merge=(recipe.merge.merge_method + (" (parameters chosen in the run: merge.auto)" if recipe.merge.auto else "")) if recipe.merge else "none", bytes_read=None, bytes_written=None, peak_memory=None,
    )
    plan.notes += _new_key_notes(run, retain)
    folder = _base_folder_if_available(run)
    if folder is None:
        plan.notes.append(f"{recipe.model.base} is converted on first run; trainable parameters are checked then")
        return plan
    check_run_location(run.root, run.doc, [folder])
    source = open_local(recipe.model.base, folder)
    _, patterns, layers = train_settings(recipe)
    check_layers(recipe, run.doc, source)
    trainable = select_trainable(list(source.tensors), patterns, layers, run.doc.where(("rsft", "trainable")))
    check_recipe_merge(run.merge_config, run.doc, source, trainable, n, recipe.sequential.strategy == "anchored")
    check_merge_auto(recipe, run.doc, source, trainable, n)
    from ..models.loading import load_tokenizer

    tokenizer = load_tokenizer(folder, recipe.model.trust_remote_code)
    fmt = prompt_format(recipe, run.doc, tokenizer)
    examples = examples_for(records, tokenizer, fmt, recipe.rsft.train_rephrases, run.doc.where(("dataset",)), system_prompt=fmt.system_prompt, eos=recipe.rsft.eos,
                            update_positions=recipe.rsft.update_positions)
    auto = recipe.rsft.layers_auto
    if auto is not None and not probe:
        plan.notes.append(f"layers: auto: a window of {auto.auto} layer(s) is chosen before training by the {auto.score} probe of the unedited model (`mergeedit plan` runs it and shows the choice)")
    elif auto is not None:
        from ..models.loading import load_model_and_tokenizer, pick_device

        model, tokenizer = load_model_and_tokenizer(folder, recipe.model.dtype, pick_device(recipe.model.device), recipe.model.trust_remote_code)
        by_case: dict = {}
        for ex in examples:
            by_case.setdefault(ex.case_id, []).append(ex)
        plan.layer_choice = probe_layer_window(recipe, model, tokenizer, records, by_case, trainable)
        del model
        trainable = select_trainable(list(source.tensors), patterns, tuple(plan.layer_choice["window"]), run.doc.where(("rsft", "layers")))
        plan.notes.append(plan.layer_choice["describe"] + " (probed now on the unedited model, as `run` will)")
    dtype = parse_user_dtype(recipe.model.dtype, run.doc.where(("model", "dtype")))
    params = sum(i.numel for i in source.tensors.values())
    trained = sum(source.tensors[n].numel for n in trainable)
    plan.base_folder = str(folder)
    plan.model_parameters = params
    plan.model_bytes = params * itemsize(dtype)
    plan.trainable_tensors = len(trainable)
    plan.trainable_parameters = trained
    plan.delta_bytes = trained * itemsize(dtype)
    merges = n if recipe.sequential.strategy == "chained" else 1
    merge_inputs = 2 if recipe.sequential.strategy == "chained" else n + 1
    plan.bytes_read = source.total_bytes + (merges * merge_inputs * plan.delta_bytes if recipe.merge else 0) + source.total_bytes
    plan.bytes_written = n * plan.delta_bytes + (merges * plan.delta_bytes if recipe.merge else 0) + plan.model_bytes
    # weights + gradients and two Adam moments for the trained tensors (fp32) + activations of one batch (rough)
    hidden = (source.config or {}).get("hidden_size", 1024)
    layers_n = (source.config or {}).get("num_hidden_layers", 12)
    activations = recipe.rsft.batch_size * 64 * hidden * layers_n * 4 * 16
    plan.peak_memory = plan.model_bytes + trained * 4 * 3 + activations + null_space_bytes(recipe, source, trainable)
    plan.notes.append("peak memory is an estimate: weights + gradients and optimizer state of the trained tensors + activations of one batch of 64-token edits"
                      + (" + the null space's projections (at most in x in/2 floats per input)" if recipe.rsft.null_space is not None else ""))
    if math.isfinite(trained) and trained == params:
        plan.notes.append("every parameter is trainable: the delta is a full model")
    return plan
