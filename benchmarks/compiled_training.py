#!/usr/bin/env python
"""R-SFT with the frozen modules compiled against eager, in the same run (issue 16: `rsft.compile`).

The shipped sequential recipe's `rsft` (`recipes/zsre-sequential.yaml`) on its first N ZsRE records as one batch, no
merge or evaluation, run twice at the same time by `mergeedit run`, one process pinned to each core (`taskset`, one
thread): `rsft.compile: false` and `rsft.compile: true`; then again with the cores swapped, so each arm has had each
core. Printed per round: steps, the training call's seconds (compiling included: inductor's cold compile in the first
round on a fresh machine, its disk cache after) and its phases from `train_report.json`. Needs two idle cores (Linux,
taskset). Run it by hand.

    .venv/bin/python benchmarks/compiled_training.py                     # 100 records, 10 epochs, 2 rounds
    .venv/bin/python benchmarks/compiled_training.py --edits 100 --max-epochs 4 --json out.json
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

ARMS = ("false", "true")


def write_recipe(folder: Path, edits: int, max_epochs: int, compiled: str) -> Path:
    shipped = yaml.safe_load(SHIPPED.read_text())
    dataset = {**shipped["dataset"], "path": str((SHIPPED.parent / shipped["dataset"]["path"]).resolve()), "limit": edits}
    recipe = {"name": f"compile-{compiled}", "model": shipped["model"], "dataset": dataset,
              "rsft": {**shipped["rsft"], "max_epochs": max_epochs, "compile": compiled == "true"},
              "merge": None, "eval": {"enabled": False}, "output": {"dir": "run"}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def one_round(cores: dict[str, int], edits: int, max_epochs: int) -> dict[str, dict]:
    """Both arms at once, arm -> its core; each arm's train report (steps, seconds, profile, compiled)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for arm in ARMS:
            folder = Path(tmp) / arm
            folder.mkdir()
            recipe = write_recipe(folder, edits, max_epochs, arm)
            cmd = ["taskset", "-c", str(cores[arm]), sys.executable, "-m", "mergeedit.cli", "run", str(recipe)]
            procs[arm] = (folder, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        out = {}
        for arm, (folder, proc) in procs.items():
            log, _ = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"rsft.compile: {arm}: the run failed:\n{log[-3000:]}")
            report = json.loads(next((folder / "run" / "stages").glob("rsft-*/train_report.json")).read_text())
            out[arm] = {"core": cores[arm], **{k: report[k] for k in ("steps", "seconds", "profile", "compiled", "precision", "learned_fraction")}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edits", type=int, default=100, help="the first N ZsRE records (those with a target train)")
    ap.add_argument("--max-epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="rounds; the arms swap cores each round")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {"cpu": cpu_model(), "edits": args.edits, "max_epochs": args.max_epochs, "rounds": []}
    print(f"CPU: {out['cpu']}; the shipped recipe's rsft on the first {args.edits} records, {args.max_epochs} epochs, one thread per arm")
    print(f"{'round':<6} {'rsft.compile':<13} {'core':>4} {'steps':>6} {'seconds':>8} {'forward':>8} {'backward':>9} {'measure':>8} {'retain':>7}  compiled")
    for r in range(args.rounds):
        cores = {"false": r % 2, "true": 1 - r % 2}
        result = one_round(cores, args.edits, args.max_epochs)
        out["rounds"].append(result)
        for arm in ARMS:
            a, p = result[arm], result[arm]["profile"]
            print(f"{r + 1:<6} {arm:<13} {a['core']:>4} {a['steps']:>6} {a['seconds']:>8.1f} {p['forward']:>8.1f} {p['backward']:>9.1f} {p['measure']:>8.1f} {p.get('retain', 0.0):>7.1f}  {a['compiled']}")
        print(f"{'':<6} eager / compiled: {result['false']['seconds'] / result['true']['seconds']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
