#!/usr/bin/env python
"""R-SFT on several CPU processes (torchrun) against one process, on the shipped sequential recipe's settings.

One batch of the first N ZsRE edits (the records `recipes/zsre-sequential.yaml` reads, its `rsft` section as it is:
the MLPs of layers 4-9, breadth-first, the retain KL, the null space, sit-out, update positions, `precision: auto`),
trained by `mergeedit run` with no merge and no evaluation, in three ways measured in one go:

1. one process, one thread (OMP_NUM_THREADS=1): the baseline;
2. one process, one thread per core (OMP_NUM_THREADS=cores): what a plain run gets from the machine;
3. `torchrun --standalone --nproc_per_node P` with one thread each (editing.collective: each process takes its share
   of every step, the gradients are summed once per step).

Printed: steps, epochs, edits learned, the training seconds of the `rsft` stage (train_report.json) and of the whole
run, steps per second and the ratio to (1); and whether the P-process run took the same steps as (1) to the same
weights (max |difference| of the trained tensors: float rounding only, since the parts of a step are summed in
another order). Run it on an otherwise idle machine: every configuration needs all the cores it asks for.

    .venv/bin/python benchmarks/process_scaling.py                    # 100 edits, 4 epochs, 2 processes
    .venv/bin/python benchmarks/process_scaling.py --edits 100 --max-epochs 10 --processes 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "recipes" / "zsre-sequential.yaml"
sys.path.insert(0, str(ROOT))

from mergeedit.pipeline.runner import DELTA_FILE  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_recipe(folder: Path, edits: int, max_epochs: int | None) -> Path:
    shipped = yaml.safe_load(SHIPPED.read_text())
    rsft = dict(shipped["rsft"])
    if max_epochs is not None:
        rsft["max_epochs"] = max_epochs
    dataset = {**shipped["dataset"], "path": str((SHIPPED.parent / shipped["dataset"]["path"]).resolve()), "limit": edits}
    recipe = {"name": "process-scaling", "model": shipped["model"], "dataset": dataset, "rsft": rsft, "merge": None,
              "eval": {"enabled": False}, "output": {"dir": "run"}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(folder: Path, edits: int, max_epochs: int | None, threads: int, processes: int) -> dict:
    shutil.rmtree(folder / "run", ignore_errors=True)  # no cached stage: every configuration trains
    recipe = write_recipe(folder, edits, max_epochs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cli = ["-m", "mergeedit.cli", "run", str(recipe)]
    cmd = [sys.executable, *cli] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *cli]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    stage = folder / "run" / "stages" / "rsft-000"
    report = json.loads((stage / "train_report.json").read_text())
    return {"processes": processes, "threads": threads, "wall_seconds": wall, "train_seconds": report["seconds"], "steps": report["steps"],
            "epochs": report["epochs"], "learned_fraction": report["learned_fraction"], "tokens": report["tokens"], "profile": report["profile"],
            "precision": report["precision"], "forward": report["forward"], "stage": str(stage)}


def differences(a: str, b: str) -> tuple[float, float]:
    """Max and mean |difference| of the two runs' trained tensors."""
    from safetensors.torch import load_file

    x, y = load_file(str(Path(a) / DELTA_FILE)), load_file(str(Path(b) / DELTA_FILE))
    diffs = [(x[n].float() - y[n].float()).abs() for n in x]
    return max(float(d.max()) for d in diffs), sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=100, help="The first N ZsRE records, trained as one batch (default 100).")
    parser.add_argument("--max-epochs", type=int, default=4, help="Cap rsft.max_epochs (default 3; the recipe's own: 0 = no cap).")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes, one thread each (default 2).")
    parser.add_argument("--no-threads-row", action="store_true", help="Skip configuration (2), one process with a thread per core.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergeedit-process-scaling"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    epochs = args.max_epochs or None
    configs = [("1 process, 1 thread", 1, 1), (f"1 process, {args.processes} threads", args.processes, 1), (f"{args.processes} processes, 1 thread each", 1, args.processes)]
    if args.no_threads_row:
        del configs[1]
    rows = []
    for k, (label, threads, processes) in enumerate(configs):
        print(f"running {label} ...", flush=True)
        row = run(args.work / f"config-{k}", args.edits, epochs, threads, processes)
        rows.append({"config": label, **row})
    base = rows[0]
    same = (rows[-1]["steps"], rows[-1]["epochs"], rows[-1]["learned_fraction"]) == (base["steps"], base["epochs"], base["learned_fraction"])
    diff, mean_diff = differences(base["stage"], rows[-1]["stage"])
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} logical CPUs; {args.edits} edits, max_epochs {epochs or 'as the recipe'}; {base['precision']}; {base['forward']}")
    print(f"{'configuration':32} {'steps':>6} {'epochs':>6} {'learned':>8} {'train s':>9} {'run s':>8} {'steps/s':>8} {'ratio':>6}")
    for r in rows:
        rate = r["steps"] / r["train_seconds"]
        print(f"{r['config']:32} {r['steps']:>6} {r['epochs']:>6} {r['learned_fraction']:>8.3f} {r['train_seconds']:>9.1f} {r['wall_seconds']:>8.1f} "
              f"{rate:>8.3f} {rate / (base['steps'] / base['train_seconds']):>5.2f}x")
    print(f"{args.processes} processes against 1: same steps, epochs and learned share: {same}; |weight difference| max {diff:.2e}, mean {mean_diff:.2e} "
          f"(lr {yaml.safe_load(SHIPPED.read_text())['rsft']['lr']}: Adam moves every element by about lr a step whatever its gradient's size, so an element "
          "whose gradient is near 0 may move the other way after a rounding difference)")
    noise = None
    if len(rows) == 3:  # the same one-process loop on other BLAS blocking: the size of a pure rounding difference
        noise = differences(base["stage"], rows[1]["stage"])
        print(f"for scale, 1 process with {args.processes} threads against 1 thread (rounding only): max {noise[0]:.2e}, mean {noise[1]:.2e}")
    for r in rows:
        print(f"  {r['config']}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["profile"].items()))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "edits": args.edits, "max_epochs": epochs, "rows": rows, "same_steps": same, "max_weight_difference": diff, "mean_weight_difference": mean_diff,
                                          "threads_rounding_difference": noise}, indent=2))


if __name__ == "__main__":
    main()
