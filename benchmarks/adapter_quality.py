#!/usr/bin/env python
"""Edit quality of the edits shipped as a LoRA adapter: what rank keeps Rel/Gen/Loc within 0.01 of the full model.

Run by hand (tens of minutes on CPU at T=100). One recipe of benchmarks/edit_quality.py (default R-SFT+TIES chained)
edits SmolLM2-135M-Instruct with the first T ZsRE records; then, for each rank, `mergeedit extract-lora` exports the
edited model's difference from the base, `mergeedit merge` folds it back into the base (`base+adapter`), and
`mergeedit eval` scores the folded model exactly as it scores the full edited model (same command, same records,
locality against the unedited base). Printed per rank: adapter size and its share of the full checkpoint, extraction
time, the adapter's relative Frobenius error, Rel/Gen/Loc and the largest gap to the full model's; then the smallest
rank whose three gaps are all <= 0.01.

    .venv/bin/python benchmarks/adapter_quality.py --edits 100
    .venv/bin/python benchmarks/adapter_quality.py --edits 10 --max-epochs 1 --max-steps 3 --ranks 8 64   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_quality import DATASET, METHODS, ROOT, recipe_for  # noqa: E402

METRICS = ("rel", "gen", "loc")
CLI = str(Path(sys.executable).parent / "mergeedit")
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def sh(*args: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([CLI, *args], env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mergeedit {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def score(model: Path, base: Path, edits: int, out: Path, generation: bool) -> dict:
    sh("eval", str(model), "--dataset", str(DATASET), "--format", "zsre", "--limit", str(edits), "--reference", str(base),
       "--no-drift", "--generation" if generation else "--no-generation", "--json", str(out))
    return {k: v["value"] for k, v in json.loads(out.read_text())["aggregate"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--method", default="R-SFT+TIES chained", choices=list(METHODS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--seq-batch", type=int, default=None)
    ap.add_argument("--generation", action="store_true", help="Also score greedy-generation exact match (slower).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-adapter-quality")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.no_generation = True  # the recipe's own eval is not used: every model is scored by the same `mergeedit eval`
    import yaml

    from mergeedit.models.builtin import materialize

    work = args.work / f"T{args.edits}"
    work.mkdir(parents=True, exist_ok=True)
    recipe = recipe_for(args.method, args)
    recipe["eval"] = {"enabled": False}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    train_s = sh("run", str(work / "recipe.yaml"))
    edited = work / "run" / "model"
    base = materialize("smollm2-135m-instruct", dtype="float32")
    full_bytes = sum(f.stat().st_size for f in edited.glob("*.safetensors"))
    full = score(edited, base, args.edits, work / "eval-full.json", args.generation)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; {args.method}, T={args.edits}; training run {train_s:.0f} s; full model {full_bytes / 1e6:.1f} MB: "
          + ", ".join(f"{k} {full[k]:.3f}" for k in METRICS))
    print(f"{'rank':>5} {'adapter MB':>11} {'of full':>8} {'extract s':>10} {'rel. err':>9} " + " ".join(f"{k:>6}" for k in METRICS) + f" {'max gap':>8}")
    rows = []
    for rank in args.ranks:
        adapter, folded = work / f"adapter-r{rank}", work / f"folded-r{rank}"
        for d in (adapter, folded):
            shutil.rmtree(d, ignore_errors=True)
        extract_s = sh("extract-lora", str(edited), "--base", str(base), str(adapter), "--rank", str(rank))
        (work / "fold.yaml").write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\ndtype: float32\n")
        sh("merge", str(work / "fold.yaml"), str(folded))
        got = score(folded, base, args.edits, work / f"eval-r{rank}.json", args.generation)
        size = (adapter / "adapter_model.safetensors").stat().st_size
        err = json.loads((adapter / "extract_lora.json").read_text())["relative_error"]
        gap = max(abs(got[k] - full[k]) for k in METRICS)
        rows.append({"rank": rank, "adapter_bytes": size, "full_bytes": full_bytes, "extract_s": extract_s, "relative_error": err, "scores": got, "max_gap": gap})
        print(f"{rank:>5} {size / 1e6:>11.2f} {size / full_bytes:>8.2%} {extract_s:>10.1f} {err:>9.2e} " + " ".join(f"{got[k]:>6.3f}" for k in METRICS) + f" {gap:>8.4f}")
        shutil.rmtree(folded, ignore_errors=True)
    within = [r["rank"] for r in rows if r["max_gap"] <= 0.01]
    print(f"smallest rank within 0.01 of the full model on {', '.join(METRICS)}: {min(within) if within else 'none of ' + str(args.ranks)}")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"work": str(args.work), "json": str(args.json)}, "full": full, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
