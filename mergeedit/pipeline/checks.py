"""The checks `run` makes before its first expensive step, written once so `validate` and `plan` make the same ones.

Each raises one MergeEditError line naming the recipe line and the fix: where the run folder goes, the drift text set,
the trained layer range, the merge section planned against the base's tensors (method, parameter names and ranges,
dtypes), and what the tokenizer does with every edit (tokenizer present, chat template for the chat forms, no target
that tokenizes to nothing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..core.errors import MergeEditError
from ..core.paths import kind_of
from ..core.yaml_source import YamlDocument
from ..io.model_source import ModelSource
from ..merging.schema import MergeConfig
from .recipe import Recipe


def merge_doc(doc: YamlDocument) -> YamlDocument:
    """The recipe's `merge:` section as a document of its own, keeping the recipe's file and line numbers."""
    lines = {k[1:]: v for k, v in doc.lines.items() if k and k[0] == "merge"}
    return YamlDocument(doc.path, doc.data.get("merge") if isinstance(doc.data, dict) else None, lines)


def expand_rsft(config: MergeConfig, count: int) -> MergeConfig:
    """Anchored strategy: the `rsft` entry stands for every batch's R-SFT model (rsft.0, rsft.1, ...)."""
    if config.models is None or count == 1:
        return config
    models = []
    for m in config.models:
        if m.model == "rsft":
            models += [m.model_copy(update={"model": f"rsft.{i}"}) for i in range(count)]
        else:
            models.append(m)
    return config.model_copy(update={"models": models})


def check_run_location(root: Path, doc: YamlDocument, inputs: list[Path]) -> None:
    """The run folder is a folder (or not there yet) and shares nothing with the base model's folder: the run replaces
    its own `model/` on every run, so an input there would be deleted."""
    where = doc.where(("output", "dir")) if ("output", "dir") in doc.lines else str(doc.path)
    if os.path.lexists(root) and not root.is_dir():
        raise MergeEditError(f"{where}: the run folder {root} is {kind_of(root)}, not a folder; set output.dir to a new or existing run folder")
    resolved = root.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise MergeEditError(f"{where}: the run folder {root} overlaps the base model folder {src}; set output.dir to a separate folder")
    model = root / "model"
    if os.path.lexists(model) and not model.is_symlink():
        from ..io.output_dir import replaceable_problem

        problem = replaceable_problem(model) if model.is_dir() else f"it is {kind_of(model)}"
        if problem is not None:
            raise MergeEditError(f"{where}: the run would replace {model}, but {problem}; move it away or set output.dir to another folder")


def check_drift_texts(recipe: Recipe, doc: YamlDocument, recipe_dir: Path) -> None:
    """A drift text set the recipe names is read and checked now, not after the pre-edit evaluation."""
    ev = recipe.eval
    if not (ev.enabled and ev.drift and ev.drift_texts is not None):
        return
    from ..evaluation.drift import load_drift_texts
    from .evaluation_stage import drift_texts_path

    try:
        load_drift_texts(drift_texts_path(ev, recipe_dir))
    except MergeEditError as exc:
        raise MergeEditError(f"{doc.where(('eval', 'drift_texts'))}: {exc}") from None


def check_compile(recipe: Recipe, doc: YamlDocument) -> None:
    """`rsft.compile: true` needs what torch.compile builds its code with (`compile_choice`'s rule, on the device the
    run will pick): said now, with the key's location, not at the first training step."""
    if recipe.rsft.compile is not True:
        return
    from ..editing.compute import compile_choice
    from ..models.loading import pick_device

    device = pick_device(recipe.model.device)  # its own error names model.device
    try:
        compile_choice("true", device, parameters=0, steps=0)
    except MergeEditError as e:
        raise MergeEditError(f"{doc.where(('rsft', 'compile'))}: {e}") from None


def check_layers(recipe: Recipe, doc: YamlDocument, base: ModelSource) -> None:
    """rsft.layers [start, end) lies inside the model's layers; `{auto: WIDTH}` is at most the model's layer count."""
    from ..io.architecture import layer_count

    auto = recipe.rsft.layers_auto
    if auto is not None:
        n = layer_count(base)
        if auto.auto > n:
            raise MergeEditError(f"{doc.where(('rsft', 'layers'))}: layers {{auto: {auto.auto}}} asks for a window of {auto.auto} layers but the model has {n}; use a width of 1..{n}")
        return
    layers = recipe.rsft.layers
    if layers is None:
        return
    n = layer_count(base)
    start, end = layers
    if not 0 <= start < end <= n:
        span = f"0..{n - 1}" if n else "none"
        raise MergeEditError(
            f"{doc.where(('rsft', 'layers'))}: rsft.layers [{start}, {end}) is not a range of the model's {n} layers (numbered {span}); "
            f"give [start, end) with 0 <= start < end <= {n}"
        )


def check_recipe_merge(config: Optional[MergeConfig], doc: YamlDocument, base: ModelSource, trainable: list[str], batches: int, anchored: bool) -> None:
    """Plan the recipe's merge against the base's tensors (standing in for every R-SFT model, which has the same names
    and shapes): an unknown method or parameter, a density out of range or a bad dtype fails here, not after training."""
    if config is None:
        return
    from ..merging.plan import build_plan

    expanded = expand_rsft(config, batches) if anchored else config
    build_plan(expanded, merge_doc(doc), opener=lambda ref: base, only=set(trainable), out_dtype="float32")


def prompt_format(recipe: Recipe, doc: YamlDocument, tokenizer):
    """The recipe's prompt format for this tokenizer (a chat form needs a chat template), located at dataset.prompt,
    with its `dataset.system_prompt`."""
    from ..editing.prompts import PromptFormat

    try:
        return PromptFormat.resolve(recipe.dataset.prompt, tokenizer, recipe.dataset.system_prompt)
    except MergeEditError as exc:
        raise MergeEditError(f"{doc.where(('dataset', 'prompt'))}: {str(exc).removeprefix('dataset.prompt: ')}") from None


def examples_for(
    records, tokenizer, fmt, rephrases: bool, where: str, *, system_prompt: Optional[str] = None, eos: bool = False, update_positions: str = "all"
) -> list:
    """Every edit's training examples (prompt ids, answer ids); a target that tokenizes to nothing is refused.
    `update_positions`: each example also names the positions that may move the trained weights: `subject`, its
    subject's tokens and its answer's (an edit without a subject, or a prompt that does not contain it, is refused);
    `question`, its question's tokens and its answer's (not the chat template's or a prompt template's own tokens)."""
    from ..editing.prompts import text_positions, training_pairs
    from ..editing.rsft import TrainingExample

    out = []
    for rec in records:
        if not tokenizer(rec.target, add_special_tokens=False)["input_ids"]:
            raise MergeEditError(f"{where}: edit {rec.case_id}: target {rec.target!r} tokenizes to nothing; fix or drop the record")
        if update_positions == "subject" and not rec.subject:
            raise MergeEditError(f"{where}: edit {rec.case_id} has no subject, which rsft.update_positions: subject needs; add one or use update_positions: all")
        for question in [rec.prompt] + (list(rec.rephrases) if rephrases else []):
            try:
                pairs = training_pairs(tokenizer, fmt, question, rec.target, system_prompt=system_prompt, eos=eos)
            except MergeEditError as exc:
                raise MergeEditError(f"{where}: edit {rec.case_id}: {exc}") from None
            for p, a in pairs:
                positions = None
                if update_positions != "all":  # the question's (or its subject's) tokens, none of the template around them
                    span = question.strip() if update_positions == "question" else rec.subject
                    found = text_positions(tokenizer, p, span)
                    if found is None:
                        raise MergeEditError(
                            f"{where}: edit {rec.case_id}: the tokenized prompt of {question!r} does not spell its {update_positions} {span!r} "
                            f"(rsft.update_positions: {update_positions}); fix the record or use update_positions: all"
                        )
                    positions = tuple(found) + tuple(range(len(p), len(p) + len(a)))
                out.append(TrainingExample(rec.case_id, p, a, positions))
    return out


def retain_path(recipe: Recipe, recipe_dir: Path) -> Optional[list[Path]]:
    """The retain file(s) the recipe names (relative to the recipe), or None for the shipped set."""
    r = recipe.rsft.retain
    if r is None or r.path is None:
        return None
    return [p if p.is_absolute() else recipe_dir / p for p in map(Path, [r.path] if isinstance(r.path, str) else r.path)]


def check_retain(recipe: Recipe, doc: YamlDocument, recipe_dir: Path):
    """rsft.retain: read the retain set and refuse one that shares a prompt or a text with the drift set the run's
    evaluation uses (the shipped one and eval.drift_texts). Returns the RetainTexts, or None when nothing reads them:
    the KL term is off, there is no `merge: {auto}` (whose locality probes are the retain texts) and no
    `rsft.null_space` (whose directions come from them)."""
    auto = recipe.merge is not None and recipe.merge.auto is not None
    if recipe.rsft.retain_weight <= 0 and not auto and recipe.rsft.null_space is None:
        return None
    from ..editing.retain import DRIFT_EVAL_TEXTS, load_retain_texts

    drift = [DRIFT_EVAL_TEXTS]
    if recipe.eval.drift_texts is not None:
        from .evaluation_stage import drift_texts_path

        drift.append(drift_texts_path(recipe.eval, recipe_dir))
    if recipe.rsft.retain is not None and recipe.rsft.retain.path is not None:
        key = ("rsft", "retain", "path")
    else:
        key = ("rsft", "retain") if recipe.rsft.retain is not None else ("merge", "auto") if auto else ("rsft", "null_space")
    try:
        return load_retain_texts(retain_path(recipe, recipe_dir), drift_texts=drift)
    except MergeEditError as exc:
        raise MergeEditError(f"{doc.where(key)}: {exc}") from None


# merge.auto chooses on the batch's own (trained) edits and on the retain texts, never on the evaluation's probes
# (paraphrases, locality prompts): choosing on those would tune the run to the figures it is judged by
AUTO_RELIABILITY = ("rel", "rel_em")
AUTO_LOCALITY = ("retain_loc",)
AUTO_SCORES = AUTO_RELIABILITY + AUTO_LOCALITY


def check_merge_auto(
    recipe: Recipe, doc: YamlDocument, base: Optional[ModelSource] = None, trainable: Optional[list[str]] = None, batches: int = 1, smallest: Optional[int] = None
) -> None:
    """merge.auto: every candidate is a valid merge (parameter names and values; planned against the base's tensors
    when `base` is given), the score keys exist, the evaluation that scores the candidates is on, and a validation
    count fits the smallest set of edits a choice is made on (`smallest`: a chained batch, or all edits)."""
    merge = recipe.merge
    if merge is None or merge.auto is None:
        return
    from .grid import apply_point, grid_points

    auto = merge.auto
    for key, allowed in (("reliability", AUTO_RELIABILITY), ("locality", AUTO_LOCALITY)):
        value = getattr(auto, key)
        if value not in allowed:
            why = " (an evaluation probe: choosing on it would tune the run to the figures it is judged by)" if value in ("gen", "loc", "port", "gen_em") else ""
            raise MergeEditError(f"{doc.where(('merge', 'auto', key))}: '{value}' cannot be chosen on{why}; use one of {', '.join(allowed)}")
    if not recipe.eval.enabled:
        raise MergeEditError(f"{doc.where(('merge', 'auto'))}: merge.auto scores every candidate with the evaluation; set eval.enabled: true (or drop auto)")
    if smallest is not None and auto.validation >= 1 and int(auto.validation) > smallest:
        what = "the smallest sequential batch has" if recipe.sequential.strategy == "chained" else "the recipe has"
        raise MergeEditError(f"{doc.where(('merge', 'auto', 'validation'))}: validation asks for {int(auto.validation)} edits but {what} {smallest}; use a fraction (0.2) or a smaller count")
    where = doc.where(("merge", "auto", "candidates"))
    plain = merge.plain()
    for point in grid_points(auto.candidates):
        config = apply_point(plain, point, where)
        if base is not None:
            check_recipe_merge(config, doc, base, trainable or [], batches, recipe.sequential.strategy == "anchored")
