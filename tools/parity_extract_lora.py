"""Parity of `mergeedit extract-lora` with `mergekit-extract-lora` (mergekit 0.1.5, its own venv, run as a subprocess).

Builds a tiny float32 Llama-style base and an edited copy (MLP and q_proj matrices of two layers changed by a decaying
low-rank update plus small full-rank noise), extracts an adapter with both tools at several ranks, and reconstructs
each changed matrix's delta from each adapter (B @ A in float64). Both are truncated SVDs, so both errors must equal the
Eckart-Young optimum sqrt(sum of the dropped squared singular values), computed here with numpy. Prints the per-rank
relative Frobenius errors of both tools and the optimum; exits 1 if they differ by more than 1e-5 of ||delta||.
mergekit's adapter is also folded back through mergeedit's `path+lora` (its rank/alpha patterns included).

    .venv/bin/python tools/parity_extract_lora.py [--work-dir DIR] [--ranks 4 16 64] [--mergekit PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mergeedit.models.toy import TINY, build_llama, load_state_dict

CHANGED = [f"model.layers.{i}.{m}" for i in (1, 3) for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj")]


def build_pair(root: Path) -> tuple[Path, Path]:
    base = build_llama(root / "base", TINY, shards=2)
    sd = load_state_dict(base)
    g = torch.Generator().manual_seed(7)
    for k, m in enumerate(CHANGED):
        w = sd[m + ".weight"]
        rows, cols = w.shape
        r = 6 + 2 * k
        decay = torch.tensor([0.7**i for i in range(r)])
        sd[m + ".weight"] = w + 0.02 * (torch.randn(rows, r, generator=g) * decay) @ torch.randn(r, cols, generator=g) + 0.001 * torch.randn(rows, cols, generator=g)
    edited = root / "edited"
    edited.mkdir()
    shutil.copy(base / "config.json", edited / "config.json")
    save_file(sd, edited / "model.safetensors", metadata={"format": "pt"})
    return base, edited


def factors(adapter: Path) -> dict[str, torch.Tensor]:
    """module -> B @ A (float64) times the adapter's scale for that module."""
    from mergeedit.io.lora import pattern_value

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key in t:
        if key.endswith(".lora_A.weight"):
            m = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = t[key].double(), t[f"base_model.model.{m}.lora_B.weight"].double()
            scale = pattern_value(cfg.get("alpha_pattern") or {}, m, cfg["lora_alpha"]) / a.shape[0]
            out[m] = scale * (b @ a)
    return out


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-extract-lora")
    ap.add_argument("--mergeedit", default=str(Path(sys.executable).parent / "mergeedit"))
    args = ap.parse_args()
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="parity-extract-lora-"))
    root.mkdir(parents=True, exist_ok=True)
    base, edited = build_pair(root)
    b, e = load_state_dict(base), load_state_dict(edited)
    deltas = {m: e[m + ".weight"].double() - b[m + ".weight"].double() for m in CHANGED}
    total = math.sqrt(sum(float((d**2).sum()) for d in deltas.values()))
    failures = 0
    print(f"{'rank':>5} {'mergeedit rel. error':>22} {'mergekit rel. error':>22} {'SVD optimum':>14} {'max |diff| / ||D||':>20}")
    for rank in args.ranks:
        me, mk = root / f"mergeedit-r{rank}", root / f"mergekit-r{rank}"
        for d in (me, mk):
            shutil.rmtree(d, ignore_errors=True)
        run([args.mergeedit, "extract-lora", str(edited), "--base", str(base), str(me), "--rank", str(rank)])
        run([args.mergekit, "--model", str(edited), "--base-model", str(base), "--out-path", str(mk), "--max-rank", str(rank),
             "-e", "embed_tokens", "-e", "lm_head", "--skip-undecomposable", "--quiet"])
        ours, theirs = factors(me), factors(mk)
        assert set(ours) == set(CHANGED), sorted(ours)
        extra = [m for m in theirs if m not in deltas and float(theirs[m].abs().max()) != 0]  # mergekit adapts every linear
        if extra:
            print(f"  mergekit adapted an unchanged module with a non-zero product: {extra[0]}"); failures += 1
        err = {"me": 0.0, "mk": 0.0, "opt": 0.0}
        worst = 0.0
        for m, d in deltas.items():
            s = np.linalg.svd(d.numpy(), compute_uv=False)
            e_me, e_mk = float(((ours[m] - d) ** 2).sum()), float(((theirs[m] - d) ** 2).sum())
            err["me"] += e_me; err["mk"] += e_mk; err["opt"] += float((s[rank:] ** 2).sum())
            worst = max(worst, abs(math.sqrt(e_me) - math.sqrt(e_mk)) / float(torch.linalg.norm(d)))
        rel = {k: math.sqrt(v) / total for k, v in err.items()}
        ok = abs(rel["me"] - rel["mk"]) <= 1e-5 and abs(rel["me"] - rel["opt"]) <= 1e-5 and worst <= 1e-5
        failures += not ok
        print(f"{rank:>5} {rel['me']:>22.9e} {rel['mk']:>22.9e} {rel['opt']:>14.6e} {worst:>20.2e}  {'ok' if ok else 'MISMATCH'}")
    # mergekit's adapter (rank_pattern/alpha_pattern, modules for every linear layer) folds back through path+lora
    folded = root / "folded-mergekit"
    shutil.rmtree(folded, ignore_errors=True)
    cfg = root / "fold.yaml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{root / f'mergekit-r{args.ranks[-1]}'}\ndtype: float32\n")
    run([args.mergeedit, "merge", str(cfg), str(folded)])
    theirs = factors(root / f"mergekit-r{args.ranks[-1]}")
    f = load_state_dict(folded)
    fold_err = max(float((f[m + ".weight"].double() - b[m + ".weight"].double() - theirs[m]).abs().max()) for m in CHANGED)
    print(f"mergekit's rank-{args.ranks[-1]} adapter folded by mergeedit path+lora: max |W' - (W + BA)| = {fold_err:.2e}")
    failures += fold_err > 1e-6
    if args.work_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
