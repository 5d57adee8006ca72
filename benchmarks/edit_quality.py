#!/usr/bin/env python
"""Edit quality of the baselines and of R-SFT + merge on SmolLM2-135M-Instruct and the shipped ZsRE sample.

Run by hand (minutes to hours on CPU). Every method is an ordinary recipe run by the pipeline (`RecipeRun`) in its own
process, so wall time and peak RSS are per method; the table compares:

    FT-L               rsft.method ft-l: every projection of the middle layer (15), lr 5e-4, no merge
    FT-M               rsft.method ft-m: the middle layer's MLP down projection, answer-token loss, lr 5e-4, no merge
    LocFT-BF           rsft.method locft-bf with its published settings (breadth-first epochs over mini-batches of 100,
                       layer round(0.2 * 30) = 6's mlp.down_proj, Adam, lr 5e-4, 25 epochs, EOS after the answer), no merge
    (all methods share the training loop's budget: up to 25 steps per batch of 10, 5 epochs, loss threshold 0.05;
    the recipe presets' one step per batch is overridden so the baselines get EasyEdit's step count, 25 a batch)
    R-SFT              three-loop R-SFT of every MLP matrix (the paper's loop: depth-first, no EOS, no retain KL, no
                       replay, whatever the recipe defaults), no merge
    R-SFT+TIES chained each batch trained from the current model, TIES-merged back into it
    R-SFT+TIES anch.   each batch trained from the base, all task vectors TIES-merged at the end

Edits arrive in sequential batches (--seq-batch, default T/5 capped at 100); every edit is scored on the final model
(WISE/AlphaEdit protocol): teacher-forced Rel/Gen, pre-vs-post Loc, generation exact match (chat template, greedy),
and general-ability drift against the unedited model (perplexity % and next-token KL on data/drift/generic.jsonl).

    .venv/bin/python benchmarks/edit_quality.py --edits 10
    .venv/bin/python benchmarks/edit_quality.py --edits 100 --json bench-100.json
    .venv/bin/python benchmarks/edit_quality.py --edits 10 --max-epochs 1 --max-steps 3   # quick check: less training
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mergeedit.pipeline.recipe import PAPER_LOOP  # noqa: E402  (the paper's loop, for the R-SFT rows)

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "data" / "zsre" / "zsre_mend_eval_first1000.json"
TIES = {"merge_method": "ties", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 0.7}}], "dtype": "float32"}
MIDDLE_LAYER = [15, 16]  # SmolLM2-135M has 30 layers

# The R-SFT rows name the paper's loop (mergeedit.pipeline.recipe.PAPER_LOOP): the rsft method's defaults are now the
# best measured settings (breadth-first, EOS, retain KL, replay), which `shipped` runs.

# method -> (rsft section overrides, merge, sequential strategy)
METHODS: dict[str, tuple[dict, object, str]] = {
    "FT-L": ({"method": "ft-l", "layers": MIDDLE_LAYER, "lr": 5.0e-4}, None, "chained"),
    "FT-M": ({"method": "ft-m", "layers": MIDDLE_LAYER, "lr": 5.0e-4}, None, "chained"),
    "LocFT-BF": ({"method": "locft-bf"}, None, "chained"),
    "R-SFT": (PAPER_LOOP, None, "chained"),
    "R-SFT+TIES chained": (PAPER_LOOP, TIES, "chained"),
    "R-SFT+TIES anchored": (PAPER_LOOP, TIES, "anchored"),
    "shipped": ({}, None, "chained"),  # recipes/zsre-sequential.yaml's rsft, merge and strategy, as a user runs it
}
SHIPPED = ROOT / "recipes" / "zsre-sequential.yaml"
BASELINES = ("FT-L", "FT-M", "LocFT-BF")  # --set never changes these: they keep their published settings
COLUMNS = [("rel", "Rel TF"), ("gen", "Gen TF"), ("loc", "Loc"), ("loc_chat", "Loc chat"), ("rel_em", "Rel gen"), ("gen_em", "Gen gen"), ("ppl_drift_pct", "ppl drift %"), ("kl", "KL")]


def recipe_for(method: str, args) -> dict:
    rsft_overrides, merge, strategy = METHODS[method]
    shipped: dict = {}
    if method == "shipped":
        import yaml

        shipped = yaml.safe_load(SHIPPED.read_text())
        rsft_overrides, merge, strategy = shipped.get("rsft") or {}, shipped.get("merge"), shipped["sequential"]["strategy"]
        rsft_overrides = {"seed": 0, **rsft_overrides}
    if method == "shipped" or rsft_overrides.get("method") == "locft-bf":  # its published settings (runner's presets): Adam, lr 5e-4, batch 100, 25 epochs, breadth-first
        rsft = {"seed": 0, **rsft_overrides}
    else:
        rsft = {"lr": 1.0e-4, "batch_size": 10, "max_epochs": 5, "max_steps_per_batch": 25, "loss_threshold": 0.05, "seed": 0, **rsft_overrides}
    if args.precision is not None:  # every method, baselines included: a comparison in one precision
        rsft["precision"] = args.precision
    if args.max_epochs is not None:
        rsft["max_epochs"] = args.max_epochs
    if args.max_steps is not None:
        rsft["max_steps_per_batch"] = args.max_steps
    seq_batch = args.seq_batch or min(100, max(1, args.edits // 5))
    recipe = {
        "name": f"bench-{method}",
        "model": {"base": "smollm2-135m-instruct", "dtype": "float32", "device": args.device},
        "dataset": {"format": "zsre", "path": str(DATASET), "limit": args.edits, "prompt": "auto"},
        "rsft": rsft,
        "sequential": {"batch_size": seq_batch, "strategy": strategy},
        "merge": merge,
        "eval": {"generation": not args.no_generation, "batch_size": 32, "max_new_tokens": 16, "examples": 0},
        "output": {"dir": "run"},
    }
    curve_every = args.curve_every or (shipped.get("eval") or {}).get("curve_every")  # shipped: the recipe's own curve
    if curve_every:
        recipe["eval"]["curve_every"] = curve_every
    recipe = copy.deepcopy(recipe)  # the module's TIES section is shared by methods: never edit it in place
    if method not in BASELINES:
        for key, value in args.set:
            apply_setting(recipe, key, value)
    return recipe


def apply_setting(recipe: dict, key: str, value) -> None:
    """`--set rsft.layers=[8,14]`: a dotted path into the recipe, the value read as YAML.

    `null` writes null, the recipe's own "off" (`rsft.retain=null`: no retain KL, `merge=null`: no merge); it does not
    remove the key, since a removed key takes the schema's default, which for retain and merge is on."""
    *parents, last = key.split(".")
    node = recipe
    for part in parents:  # a number indexes a list: merge.models.0.parameters.weight
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_setting(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: write KEY=VALUE, e.g. --set rsft.layers=[8,14]")
    return key.strip(), yaml.safe_load(value)


def row_name(method: str, args) -> str:
    return f"{method} [{args.label}]" if args.label else method


def peak_rss_bytes() -> int:
    """This process's own high-water mark (VmHWM belongs to the address space, so it starts afresh at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(recipe_path: Path, out_path: Path) -> None:
    """Run one recipe in this (fresh) process and write its scores, time and peak memory."""
    from mergeedit.pipeline.runner import RecipeRun

    started = time.perf_counter()
    result = RecipeRun(recipe_path).run()
    metrics = {k: v["value"] for k, v in (result.metrics or {}).items()}
    pre = {k: v["value"] for k, v in (result.pre_metrics or {}).items()}
    out_path.write_text(json.dumps({
        "metrics": metrics, "pre_metrics": pre, "seconds": time.perf_counter() - started, "run_seconds": result.seconds,
        "peak_rss": peak_rss_bytes(), "batches": result.batches, "edits": result.edits,
        "learned": [r.get("learned_fraction") for r in result.train_reports],
        "train_steps": sum(r.get("steps", 0) or 0 for r in result.train_reports),
        # each stage run here: its seconds and its own peak RSS (where the process's peak comes from)
        "stages": {name: {"seconds": round(p["seconds"], 2), "peak_rss": p["peak_rss"]} for name, p in (result.stage_profile or {}).items()},
    }, indent=2))


def run_method(method: str, args, work: Path) -> dict:
    import yaml

    folder = work / f"T{args.edits}" / row_name(method, args).replace(" ", "_").replace("+", "-").replace("[", "").replace("]", "")
    if folder.exists() and not args.reuse:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(method, args), sort_keys=False))
    shared = work / f"T{args.edits}" / "_unedited-stages"  # the unedited model's scores: the same for every method
    reused = []
    if args.share_unedited and shared.is_dir():
        for stage in sorted(shared.iterdir()):
            target = folder / "run" / "stages" / stage.name
            if not target.exists():  # the run checks each stage's key and recomputes one whose inputs differ
                shutil.copytree(stage, target)
                reused.append(stage.name)
    out = folder / "bench.json"
    started = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(recipe), str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(out.read_text())
    if args.json:  # the per-batch curve beside the JSON, when the run made one
        for name in ("curve.json", "curve.png"):
            found = sorted((folder / "run").rglob(name))
            if found:
                shutil.copyfile(found[-1], args.json.with_name(f"{args.json.stem}-{row_name(method, args).replace(' ', '_').replace('+', '-')}-{name}"))
    if args.share_unedited:
        for stage in sorted((folder / "run" / "stages").glob("*pre-*")):
            if stage.is_dir() and not stage.name.startswith(".") and not (shared / stage.name).exists():
                shutil.copytree(stage, shared / stage.name)
    if not args.keep:  # R-SFT deltas, merges and the export take about 2 GB a method at T=10
        shutil.rmtree(folder / "run", ignore_errors=True)
    return {"method": row_name(method, args), "base_method": method, "settings": [list(kv) for kv in args.set], "precision": args.precision, "wall_seconds": wall,
            "unedited_stages_copied": reused, **data}


def print_table(rows: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    edits = rows[0]["edits"] if rows else args.edits  # records without a target are skipped (the first 1,000 give 998)
    records = f" from the first {args.edits} records" if edits != args.edits else ""
    table = Table(title=f"SmolLM2-135M-Instruct, {edits} ZsRE edits{records} (sequential batches of {args.seq_batch or min(100, max(1, args.edits // 5))}); scored on the final model")
    for col in ["method", *[c for _, c in COLUMNS], "wall s", "peak RSS MB"]:
        table.add_column(col, justify="left" if col == "method" else "right")
    cell = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    if rows:
        pre = rows[0]["pre_metrics"]
        table.add_row("(unedited)", *[cell(pre.get(k)) for k, _ in COLUMNS], "", "")
    for r in rows:
        m = r["metrics"]
        table.add_row(r["method"], *[cell(m.get(k), "{:+.2f}" if k == "ppl_drift_pct" else "{:.4f}" if k == "kl" else "{:.3f}") for k, _ in COLUMNS],
                      f"{r['wall_seconds']:.0f}", f"{r['peak_rss'] / 2**20:.0f}")
    Console(width=200).print(table)
    print("TF: teacher-forced token accuracy; Loc: pre-vs-post argmax agreement; gen: greedy-generation exact match "
          "(chat template); drift: perplexity change on generic text and mean next-token KL(ref || post), in nats.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=10, help="T: the first T ZsRE records (10, 100, 1000); a record without a target is skipped (1000 gives 998 edits).")
    parser.add_argument("--seq-batch", type=int, default=None, help="Edits per sequential batch (default T/5, at most 100).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD", help=f"Subset of: {', '.join(METHODS)}")
    parser.add_argument("--max-epochs", type=int, default=None, help="Override rsft.max_epochs (shrinks training for a quick check).")
    parser.add_argument("--max-steps", type=int, default=None, help="Override rsft.max_steps_per_batch (shrinks training for a quick check).")
    parser.add_argument("--no-generation", action="store_true", help="Skip the generation protocol (faster).")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "auto"], default=None,
                        help="rsft.precision for every method, the baselines included (default: each recipe's own; float32 unless set).")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-edit-quality", help="Run directories go here.")
    parser.add_argument("--keep", action="store_true", help="Keep each method's run directory (about 2 GB each); by default it is deleted once scored.")
    parser.add_argument("--reuse", action="store_true", help="Reuse kept run directories (cached stages: times are then not comparable).")
    parser.add_argument("--json", type=Path, default=None, help="Write every number here.")
    parser.add_argument("--no-share-unedited", dest="share_unedited", action="store_false",
                        help="Score the unedited model (stages pre-eval, pre-drift: 5-15 minutes at T=1000) in every method's run; by default "
                        "the first run's are copied into the next ones (the run recomputes any whose inputs differ), so later rows' wall times exclude them.")
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="Change the R-SFT methods' recipes (not the baselines'), e.g. --set rsft.layers=[8,14] --set merge.models.0.parameters.weight=0.8; repeatable.")
    parser.add_argument("--label", default=None, help="Name these rows METHOD [LABEL] (an ablation row beside the default one).")
    parser.add_argument("--curve-every", type=int, default=None, help="eval.curve_every: score after every k sequential batches; curve.json/png are copied beside --json (default: none; the shipped recipe's own eval.curve_every for shipped).")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    for method in args.methods:
        print(f"running {method} ...", flush=True)
        rows.append(run_method(method, args, args.work))
        r = rows[-1]
        print(f"  {r['wall_seconds']:.0f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MB, learned {r['learned']}", flush=True)
        if args.json:  # after every method, so a long run that is stopped keeps what it finished
            write_json(args, rows)
    print_table(write_json(args, rows) if args.json else rows, args)
    if args.json:
        print(f"wrote {args.json}")


def write_json(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Write this run's rows, keeping other methods' rows from an earlier run with the same recipes.

    A T=100 table takes hours on CPU, so methods are often run in separate invocations into the same file; a row is
    kept only when its method's recipe is unchanged, and a method run now replaces its old row.
    """
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
    recipes = {row_name(m, args): recipe_for(m, args) for m in args.methods}
    earlier: list[dict] = []
    if args.json.exists():  # rows of other invocations (other methods or labels) are kept with their own recipes
        old = json.loads(args.json.read_text())
        for r in old.get("results", []):
            name = r["method"]
            if name not in recipes and name in old.get("recipes", {}):
                earlier.append(r)
                recipes[name] = old["recipes"][name]
    order = {m: i for i, m in enumerate(METHODS)}
    merged = sorted(earlier + rows, key=lambda r: (order.get(r.get("base_method", r["method"]), len(order)), r["method"]))
    args.json.write_text(json.dumps({"settings": settings, "recipes": recipes, "results": merged}, indent=2))
    return merged

if __name__ == "__main__":
    main()
