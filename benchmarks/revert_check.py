#!/usr/bin/env python
"""`mergeedit revert` on SmolLM2-135M-Instruct and the shipped ZsRE sample: does taking a batch back work on a real model?

Run by hand (minutes on CPU for T=20; T=100 is a long CPU run). Three steps through the CLI, each its own process:

1. `mergeedit run` of an R-SFT + TIES recipe (T edits in sequential batches of --batch-size, --strategy anchored or
   chained), which writes RUN/ledger.jsonl;
2. `mergeedit revert RUN --batch K OUT`, which prints the reverted and kept facts' scores (before the edit, in the run,
   after the revert) and the stages it ran and reused;
3. `mergeedit run` of the same recipe without batch K's records (`dataset.select`), then a tensor-by-tensor byte
   comparison of OUT with that model: for anchored runs they must be equal (a revert is a re-merge of the same deltas);
   for chained runs they are equal when training is deterministic on the machine.

    .venv/bin/python benchmarks/revert_check.py --edits 20 --batch-size 5 --revert 2
    .venv/bin/python benchmarks/revert_check.py --edits 100 --batch-size 20 --revert 3 --strategy chained --json rv.json

Prints the CPU model, each step's wall time, the revert's score lines and the comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "data" / "zsre" / "zsre_mend_eval_first1000.json"
CLI = Path(sys.executable).with_name("mergeedit")


def recipe(folder: Path, args, select: list[int] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "name": f"revert-check-{args.strategy}",
        "model": {"base": "smollm2-135m-instruct", "dtype": "float32", "device": args.device},
        "dataset": {"format": "zsre", "path": str(DATASET), **({"select": select} if select else {"limit": args.edits})},
        "rsft": {"lr": 1.0e-4, "batch_size": 10, "max_epochs": args.max_epochs, "max_steps_per_batch": 25, "loss_threshold": 0.05, "seed": 0},
        "sequential": {"batch_size": args.batch_size, "strategy": args.strategy},
        "merge": {"merge_method": "ties", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 0.5}}], "parameters": {"normalize": False}, "dtype": "float32"},
        "eval": {"generation": False, "drift": False, "examples": 0, "batch_size": 32},
        "output": {"dir": "run"},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def step(name: str, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([str(CLI), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    print(f"{name}: {seconds:.1f} s", flush=True)
    return seconds, done.stdout


def tensors(folder: Path) -> dict:
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--revert", type=int, default=2, help="The batch (from 1) to take back.")
    p.add_argument("--strategy", choices=["anchored", "chained"], default="anchored")
    p.add_argument("--max-epochs", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path, default=Path("revert-check"))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}; T={args.edits}, sequential batches of {args.batch_size}, {args.strategy}, reverting batch {args.revert}")
    work = args.work.resolve()
    full = recipe(work / "full", args, None)
    t_run, _ = step("run (all batches)", "run", str(full))
    out = work / f"without-{args.revert}"
    t_revert, shown = step(f"revert --batch {args.revert}", "revert", str(work / "full" / "run"), "--batch", str(args.revert), str(out), "--overwrite")
    print(shown.strip())
    lo, hi = (args.revert - 1) * args.batch_size, args.revert * args.batch_size
    keep = [i for i in range(args.edits) if not lo <= i < hi]
    never = recipe(work / "never", args, keep)
    t_never, _ = step("run (never had the batch)", "run", str(never))
    a, b = tensors(out), tensors(work / "never" / "run" / "model")
    differing = sorted(k for k in a if a[k] != b.get(k))
    print(f"reverted model vs a run that never had batch {args.revert}: {len(a)} tensors, {len(differing)} differ" + (f" (first: {differing[0]})" if differing else " (byte for byte equal)"))
    entry = json.loads((work / "full" / "run" / "ledger.jsonl").read_text().splitlines()[-1])
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "settings": vars(args) | {"work": str(work), "json": str(args.json)}, "seconds": {"run": t_run, "revert": t_revert, "never": t_never}, "revert": entry, "tensors": len(a), "differing": differing}, indent=2))


if __name__ == "__main__":
    main()
