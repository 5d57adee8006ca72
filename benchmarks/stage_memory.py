#!/usr/bin/env python
"""What the resident set keeps between a run's stages, with and without handing the free heap back (issue 16).

The shipped sequential recipe's settings (`recipes/zsre-sequential.yaml`: its `rsft` and `merge` sections) on the
first N ZsRE edits in chained batches of B, fewer epochs, no evaluation, run twice, each in a fresh process on one
thread: as shipped (`core.memory.release_free_memory`, glibc's malloc_trim, before every stage) and with that call
switched off. Printed for every stage: the resident set when it starts and its own peak (VmHWM, reset at its start).
Run it by hand on an otherwise idle core.

    .venv/bin/python benchmarks/stage_memory.py                       # 120 edits, batches of 20, 2 epochs
    .venv/bin/python benchmarks/stage_memory.py --edits 300 --batch 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "recipes" / "zsre-sequential.yaml"
sys.path.insert(0, str(ROOT))

from process_scaling import cpu_model  # noqa: E402

CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from mergeedit.core.memory import current_rss
from mergeedit.pipeline import run_dir
from mergeedit.pipeline.runner import RecipeRun
if {off!r}:
    run_dir.release_free_memory = lambda: False
starts = {{}}
real = run_dir.reset_peak_rss
def reset():  # called as each stage starts, after the release (if on)
    starts[len(starts)] = current_rss()
    return real()
run_dir.reset_peak_rss = reset
result = RecipeRun({recipe!r}).run()
names = list(result.stage_profile)
print(json.dumps([{{"stage": n, "start": starts[i], "peak": result.stage_profile[n]["peak_rss"], "seconds": result.stage_profile[n]["seconds"]}}
                  for i, n in enumerate(names)]))
"""


def write_recipe(folder: Path, edits: int, batch: int, max_epochs: int) -> Path:
    shipped = yaml.safe_load(SHIPPED.read_text())
    dataset = {**shipped["dataset"], "path": str((SHIPPED.parent / shipped["dataset"]["path"]).resolve()), "limit": edits}
    recipe = {"name": "stage-memory", "model": shipped["model"], "dataset": dataset, "rsft": {**shipped["rsft"], "max_epochs": max_epochs},
              "sequential": {"batch_size": batch, "strategy": "chained"}, "merge": shipped["merge"], "eval": {"enabled": False},
              "output": {"dir": "run"}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edits", type=int, default=120)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--max-epochs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = {"cpu": cpu_model(), "edits": args.edits, "batch": args.batch, "max_epochs": args.max_epochs, "arms": {}}
    for arm, off in (("released", False), ("kept", True)):
        with tempfile.TemporaryDirectory() as tmp:
            recipe = write_recipe(Path(tmp), args.edits, args.batch, args.max_epochs)
            proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), off=off, recipe=str(recipe))], env=env,
                                  capture_output=True, text=True, cwd=tmp)
            if proc.returncode != 0:
                sys.exit(f"{arm}: the run failed:\n{proc.stderr[-3000:]}")
            out["arms"][arm] = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"CPU: {out['cpu']}; {args.edits} edits in chained batches of {args.batch}, {args.max_epochs} epochs, one thread")
    print(f"{'stage':<10} {'start, kept':>12} {'start, released':>16} {'peak, kept':>11} {'peak, released':>15}")
    for kept, released in zip(out["arms"]["kept"], out["arms"]["released"]):
        print(f"{kept['stage']:<10} {kept['start'] / gib:>10.2f} G {released['start'] / gib:>14.2f} G {kept['peak'] / gib:>9.2f} G {released['peak'] / gib:>13.2f} G")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
