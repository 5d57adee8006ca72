"""`mergeedit revert RUN --batch K OUT`: the run's model without some of its batches, scored, recorded in the ledger.

Anchored runs keep each batch's task vector separate, so a revert re-merges the remaining ones (no training). Chained
runs replay from the last batch before the first one taken back: the stages up to there are the run's own (reused from
the cache), the remaining later batches are trained again from that point (as a run that never had the reverted
batches would train them: replay, if the recipe has it, draws only from the kept batches). The revert's own stages live
in the run directory under `revert-KKK-...` names, so the run's stages are never replaced and a second identical revert
is all cache hits.

The result is scored like a run: the reverted facts should fall back to their pre-edit scores, the kept facts should
keep the scores they had in the run; both comparisons are printed and recorded, with the tolerance used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..core.errors import MergeEditError
from ..io.integrity import OutputLock, add_to_manifest, sha256_file, write_errors_named
from ..io.model_source import open_local, overlay
from ..io.output_dir import AtomicOutputDir, check_output_location
from .ledger import (
    LEDGER_FILE,
    append_entry,
    batch_entries,
    delta_problem,
    group_means,
    labelled,
    ledger_path,
    now,
    read_ledger,
    tensors_sha256,
    write_ledger,
)
from .run_dir import stable_hash
from .runner import (
    DELTA_FILE,
    RecipeRun,
    RunResult,
    auto_merge_in_ledger,
    expand_rsft,
    load_delta,
    merge_stage_name,
    rsft_stage_name,
)

CHECKED = ("rel", "gen")  # teacher-forced scores: what "falls back" and "keeps" are judged on


@dataclass
class RevertResult:
    out: Path
    reverted: list[int]
    kept: list[int]
    strategy: str
    stages_run: list[str]
    stages_cached: list[str]
    groups: Optional[dict]
    checks: list[dict]
    entry: dict
    seconds: float
    notes: list[str] = field(default_factory=list)


def _fail(where: Path, message: str) -> MergeEditError:
    return MergeEditError(f"{where}: {message}")


def _plan(run_dir: Path, batches: list[int]) -> tuple[list[dict], list[dict], list[dict]]:
    """(every batch entry, the reverted ones, the kept ones), after checking the request against the ledger."""
    entries = read_ledger(run_dir)
    if not (run_dir / "stages").is_dir():
        run = next((e.get("run") for e in entries if e.get("run")), None)
        raise _fail(run_dir, "is a model folder, not a run directory; revert works on the run that made it" + (f" ({run})" if run else ""))
    rows = sorted((e for e in entries if e["kind"] == "batch"), key=lambda e: e["batch"])
    numbers = [e["batch"] for e in rows]
    if not rows:
        raise _fail(ledger_path(run_dir), "names no batches; rerun the recipe to record them")
    if not batches:
        raise _fail(run_dir, "no batch to revert; pass --batch K (repeatable)")
    span = f"{numbers[0]}" if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}"
    for k in batches:
        if k not in numbers:
            raise _fail(ledger_path(run_dir), f"batch {k} is not in the ledger (it has batch(es) {span}); pass --batch with one of those")
    reverted = [e for e in rows if e["batch"] in batches]
    kept = [e for e in rows if e["batch"] not in batches]
    if not kept:
        raise _fail(run_dir, f"reverting every batch ({span}) leaves the unedited base model ({rows[0]['base']['ref']}); use the base itself")
    return rows, reverted, kept


def _recipe_of(run_dir: Path, rows: list[dict]) -> Path:
    recipe = rows[0]["recipe"]
    path = Path(recipe["path"])
    if not path.is_file():
        raise _fail(ledger_path(run_dir), f"the run's recipe {path} is missing; revert re-reads it and its dataset, so restore it")
    if sha256_file(path) != recipe["sha256"]:
        raise _fail(path, "changed since the run recorded its ledger (sha256 differs); restore the recipe the run used, or rerun it and revert then")
    return path


def _check_records(run_dir: Path, rows: list[dict], batches: list) -> None:
    if len(batches) != len(rows):
        raise _fail(ledger_path(run_dir), f"the recipe's dataset now makes {len(batches)} batch(es), the ledger has {len(rows)}; restore the dataset the run used")
    for e, records in zip(rows, batches):
        now_ = [(r.case_id, r.prompt, r.target) for r in records]
        then = [(x["case_id"], x["prompt"], x["target"]) for x in e["edits"]]
        if now_ != then:
            raise _fail(ledger_path(run_dir), f"batch {e['batch']}: the recipe's dataset no longer holds the edits the ledger recorded; restore the dataset the run used")


def revert_run(
    run_dir: Path, batches: list[int], out: Path, *, overwrite: bool = False, tolerance: float = 0.1, reporter=None
) -> RevertResult:
    """Write RUN's model without `batches` (ledger numbers, from 1) to OUT, score it, and record the revert."""
    started = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    requested = sorted(set(batches))
    rows, reverted, kept = _plan(run_dir, requested)
    recipe_path = _recipe_of(run_dir, rows)
    check_output_location(out, [run_dir], overwrite, protect=(recipe_path,))
    runner = RecipeRun(recipe_path, reporter=reporter)
    if runner.root != run_dir.resolve():
        raise _fail(recipe_path, f"now writes its run to {runner.root}, not {run_dir.resolve()}; restore the recipe the run used")
    strategy = runner.recipe.sequential.strategy
    first = requested[0]  # chained: the run's stages before this batch are reused
    needed = kept if strategy == "anchored" else [e for e in rows if e["batch"] < first]
    for e in needed:
        refs = [(e["delta"], "R-SFT delta")] + ([(e["merge"], "merged delta")] if strategy == "chained" and e.get("merge") else [])
        for ref, what in refs:
            problem = delta_problem(run_dir, ref, e["batch"], what)
            if problem is not None:
                raise MergeEditError(problem)

    with OutputLock(out):
        s = runner.open_session()
        all_batches = runner.batches(s.records)
        _check_records(run_dir, rows, all_batches)
        if tensors_sha256(s.initial) != rows[0]["base"].get("trained_sha256"):
            raise _fail(s.base_folder, f"is not the run's base: its trained tensors differ from those the ledger recorded for {rows[0]['base']['ref']}; restore the base the run used")
        result = runner.new_result(s)
        pre, drift = runner.pre_edit_stages(s, s.records, result)
        tag = "revert-" + "-".join(f"{k:03d}" for k in requested)
        kept_batches = [all_batches[e["batch"] - 1] for e in kept]
        config = runner.merge_config
        if strategy == "anchored":
            deltas = [open_local(f"rsft.{i}", run_dir / "stages" / e["delta"]["stage"]) for i, e in enumerate(kept)]
            ids = [s.run.output_id(e["delta"]["stage"]) for e in kept]
            if runner.merge_auto is not None:  # choose again on the kept edits, as a run without the batch would

                def candidate(cfg, tmp):
                    runner.merge_into(tmp, expand_rsft(cfg, len(deltas)), runner.anchored_sources(s, deltas), set(s.trainable))

                config = runner.merge_point(s, result, f"{tag}-merge-auto", [r for b in kept_batches for r in b], stable_hash(ids), candidate)
            delta, upstream = runner.anchored_merge(s, deltas, ids, config, f"{tag}-merge")
            rsft_stages = [e["delta"]["stage"] for e in kept]
            merge_stages = [f"{tag}-merge"] * len(kept)
            used = expand_rsft(config, len(kept)).model_dump(mode="json")
            reports = [e.get("metrics", {}).get("train", {}) for e in kept]
        else:
            renamed = len([e for e in kept if e["batch"] < first])  # kept batches before the first reverted one
            trained = runner.train_batches(s, result, batches=kept_batches, renamed_from=renamed, prefix=f"{tag}-")
            delta, upstream = trained.current_delta, trained.upstream
            name = lambda n, i: (f"{tag}-" if i >= renamed else "") + n  # noqa: E731
            rsft_stages = [name(rsft_stage_name(i), i) for i in range(len(kept))]
            merge_stages = [name(merge_stage_name(i), i) if config is not None else None for i in range(len(kept))]
            used = config.model_dump(mode="json") if config is not None else None
            reports = result.train_reports

        scores = _score(runner, s, delta, upstream, pre, drift, tag) if runner.recipe.eval.enabled else None
        base = rows[0]["base"]
        out_rows = batch_entries(
            run_root=run_dir, recipe_path=recipe_path, strategy=strategy, base=base, batches=kept_batches, rsft_stages=rsft_stages,
            merge_stages=merge_stages, merge_config=used, train_reports=reports, per_edit=scores["per_edit"] if scores else None, previous=rows,
        )
        out_rows = auto_merge_in_ledger(out_rows, result.merge_choices, runner.merge_config, len(kept), strategy)
        for row, e in zip(out_rows, kept):
            row["batch"] = e["batch"]  # the run's numbering: batch 3 stays batch 3 after batch 2 is taken back
        groups, checks = _compare(scores, reverted, kept, tolerance) if scores else (None, [])
        final = delta.folder / DELTA_FILE
        entry = {
            "kind": "revert", "batches": requested, "kept": [e["batch"] for e in kept], "strategy": strategy, "run": str(run_dir.resolve()),
            "recipe": rows[0]["recipe"], "base": base, "out": str(out.resolve()),
            "delta": {"stage": final.parent.name, "file": final.relative_to(run_dir.resolve()).as_posix(), "sha256": sha256_file(final), "bytes": final.stat().st_size},
            "stages_run": list(s.run.ran), "stages_cached": list(s.run.reused), "groups": groups, "checks": checks, "tolerance": tolerance,
            "metrics": {k: v for k, v in (scores or {}).get("metrics", {}).items()}, "recorded": now(),
        }
        card = RunResult(out, out, sum(len(b) for b in kept_batches), len(kept), [dict(r) for r in reports], None, None, ledger=out_rows + [entry])
        if scores:
            ids = [r.case_id for b in kept_batches for r in b]
            model_level = {k: v for k, v in scores["metrics"].items() if k in ("ppl", "ppl_drift_pct", "kl")}
            card.metrics = {**labelled(group_means(scores["per_edit"], ids), scores["per_edit"], ids), **model_level}
            card.pre_metrics = {**labelled(group_means(scores["base_per_edit"], ids), scores["base_per_edit"], ids), **(drift.reference_metrics() if drift else {})}
        _write(runner, s, out, overlay(s.base_source, delta, "edited"), out_rows + [entry], card)
        append_entry(run_dir, entry)
    notes = [] if scores else ["not scored: evaluation is disabled in the recipe"]
    return RevertResult(out, requested, entry["kept"], strategy, entry["stages_run"], entry["stages_cached"], groups, checks, entry, time.perf_counter() - started, notes)


def _score(runner: RecipeRun, s, delta, upstream: str, pre, drift, tag: str) -> dict:
    """Stage `{tag}-eval`: every edit scored on the reverted model (and on the base, for the pre-edit side)."""
    from ..evaluation.evaluate import evaluate_edits
    from .evaluation_stage import post_edit_evaluation

    cfg = runner.recipe.eval
    inputs = {"upstream": upstream, "pre": s.run.output_id("pre-eval"), "drift": drift.stage_id if drift else None, "eval": runner.eval_key()}

    def compute() -> dict:
        s.model.load_state_dict(s.initial, strict=False)
        base = evaluate_edits(
            s.model, s.tokenizer, s.records, generation=cfg.generation, chat_template=s.fmt.uses_chat, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens
        )
        load_delta(s.model, delta)
        post = post_edit_evaluation(s.model, s.tokenizer, s.records, s.fmt, cfg, pre, drift)
        return {"metrics": post["metrics"], "per_edit": post["per_edit"], "base_per_edit": base.records}

    return s.run.produce_json(f"{tag}-eval", inputs, compute, detail="every edit on the reverted model and on the base")[1]


def _compare(scores: dict, reverted: list[dict], kept: list[dict], tolerance: float) -> tuple[dict, list[dict]]:
    """Per group (reverted, kept): mean scores before the edit, in the run, after the revert; and the checks.

    A reverted edit whose target a kept edit also has (ZsRE holds paraphrased duplicates of one fact) is still taught
    by the kept batches, so it need not fall back: such pairs are listed, and when there are some, the reverted edits
    without them are checked again on their own (group `reverted_unshared`)."""
    key = lambda x: x["target"].strip().lower()  # noqa: E731
    kept_targets = {key(x): x["case_id"] for e in kept for x in e["edits"]}
    shared = [[x["case_id"], kept_targets[key(x)]] for e in reverted for x in e["edits"] if key(x) in kept_targets]
    unshared = [{**e, "edits": [x for x in e["edits"] if key(x) not in kept_targets]} for e in reverted]
    plan = [("reverted", reverted, "before_edit"), ("kept", kept, "in_run")]
    if shared and any(e["edits"] for e in unshared):
        plan.insert(1, ("reverted_unshared", unshared, "before_edit"))
    groups, checks = {}, []
    for group, rows, reference in plan:
        ids = [x["case_id"] for e in rows for x in e["edits"]]
        in_run = [{"case_id": x["case_id"], **(x.get("scores") or {})} for e in rows for x in e["edits"]]
        groups[group] = {
            "edits": len(ids),
            "before_edit": group_means(scores["base_per_edit"], ids),
            "in_run": group_means(in_run, ids),
            "after_revert": group_means(scores["per_edit"], ids),
        }
        for name in CHECKED:
            want, got = groups[group][reference][name], groups[group]["after_revert"][name]
            if want is None or got is None:
                continue
            # reverted facts: back to the pre-edit score, either way; kept facts: no loss beyond the tolerance (a gain is
            # allowed: taking a batch's task vector out also takes out its interference with the others)
            ok = abs(got - want) <= tolerance if group != "kept" else got >= want - tolerance
            checks.append({"group": group, "metric": name, "reference": reference, "expected": want, "got": got, "ok": ok})
    groups["reverted"]["shared_targets"] = shared
    return groups, checks


def _write(runner: RecipeRun, s, out: Path, source, entries: list[dict], card: RunResult) -> None:
    """OUT, whole or not at all: the model, its ledger (kept batches + this revert) and card, in its manifest."""
    from .model_card import write_model_card

    with write_errors_named(out, "reverted model"), AtomicOutputDir(out) as tmp:
        runner.export_model(tmp, source, s.base_folder)
        model = tmp / "model"
        write_ledger(model / LEDGER_FILE, entries)
        add_to_manifest(model, LEDGER_FILE)
        write_model_card(model / "README.md", runner.recipe, runner.doc, card)
        add_to_manifest(model, "README.md")
        for item in list(model.iterdir()):
            item.rename(tmp / item.name)
        model.rmdir()


def revert_summary(result: RevertResult) -> list[str]:
    """Lines for the CLI: what was reverted, the stages, and how the two groups of facts scored."""
    lines = [
        f"reverted batch(es) {', '.join(map(str, result.reverted))} of the {result.strategy} run; kept {', '.join(map(str, result.kept))}",
        f"stages run: {len(result.stages_run)} ({', '.join(result.stages_run) or '-'}); cached: {len(result.stages_cached)}; {result.seconds:.1f} s",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    tol = result.entry["tolerance"]
    for c in result.checks:
        g = result.groups[c["group"]]
        rule = f"back to the pre-edit score within {tol}" if c["group"] != "kept" else f"no loss beyond {tol} from the run"
        lines.append(
            f"{'ok' if c['ok'] else 'OFF'}: {g['edits']} {c['group'].replace('_unshared', ' (not taught by kept batches)')} edit(s), {c['metric']}: before edit {fmt(g['before_edit'][c['metric']])}, "
            f"in the run {fmt(g['in_run'][c['metric']])}, after the revert {fmt(g['after_revert'][c['metric']])} ({rule})"
        )
    shared = (result.groups or {}).get("reverted", {}).get("shared_targets") or []
    if shared:
        pairs = ", ".join(f"{a} = {b}" for a, b in shared[:4]) + (" ..." if len(shared) > 4 else "")
        lines.append(f"note: {len(shared)} reverted edit(s) have the target of a kept edit ({pairs}); the kept batches teach those answers too, so they need not fall back")
    return lines + result.notes
