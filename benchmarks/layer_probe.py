#!/usr/bin/env python
"""`layers: auto` on SmolLM2-135M-Instruct: the gradient-norm probe's per-layer scores and pick for ZsRE edits.

Run by hand (about a minute per probe on 2 CPU cores):

    .venv/bin/python benchmarks/layer_probe.py --edits 100 --json layer-probe.json

For the first N usable ZsRE records of data/zsre, each edit is turned into training pairs exactly as a run trains it
(dataset.prompt auto: raw and chat forms) and probed for two trainable sets: every MLP matrix (R-SFT's default) and
the MLP down projection only (FT-M / LocFT-BF). Prints, per layer, the gradient norm of the mean answer loss and the
same divided by the layer's weight norm ("relative"), and the window each picks for widths 1 and 3. It also times the
probe against one training step on a batch of 10 of the same edits (the baseline, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "data" / "zsre" / "zsre_mend_eval_first1000.json"
SETS = {
    "mlp (gate, up, down)": [r"mlp\.(gate_proj|up_proj|down_proj)\.weight$"],
    "mlp.down_proj": [r"mlp\.down_proj\.weight$"],
}


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--train-check", type=str, default="", help="comma-separated layers: train each one's down_proj alone (Adam lr 5e-4) on the first 20 edits for --check-steps steps and report the answer loss")
    ap.add_argument("--check-steps", type=int, default=8)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeedit.editing.datasets import load_edits
    from mergeedit.editing.localize import best_window, probe_layer_scores
    from mergeedit.editing.prompts import PromptFormat, training_pairs
    from mergeedit.editing.tokens import pad_batch, pad_token_id
    from mergeedit.editing.trainable import select_trainable
    from mergeedit.models.builtin import materialize

    folder = materialize("smollm2-135m-instruct", dtype="float32")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    records = load_edits(DATASET, "zsre", limit=args.edits)
    fmt = PromptFormat.resolve("auto", tok)
    pairs = [p for r in records for p in training_pairs(tok, fmt, r.prompt, r.target)]
    pad = pad_token_id(tok, model)
    names = [n for n, _ in model.named_parameters()]
    out = {"model": "smollm2-135m-instruct (float32)", "cpu": cpu_model(), "threads": torch.get_num_threads(), "edits": len(records),
           "pairs": len(pairs), "prompt": fmt.describe(), "probes": {}}

    for label, patterns in SETS.items():
        trainable = select_trainable(names, patterns, None, "benchmark")
        t0 = time.perf_counter()
        grad = probe_layer_scores(model, pairs, trainable, pad_id=pad, batch_size=args.batch_size)
        seconds = time.perf_counter() - t0
        named = dict(model.named_parameters())
        layers = len(grad)
        wnorm = [sum(float(named[n].detach().double().pow(2).sum()) for n in trainable if f".layers.{i}." in n) ** 0.5 for i in range(layers)]
        rel = [g / w for g, w in zip(grad, wnorm)]
        entry = {"seconds": seconds, "grad": grad, "relative": rel,
                 "pick": {f"{score} width {w}": list(best_window(s, w)) for score, s in (("grad", grad), ("relative", rel)) for w in (1, 3)}}
        out["probes"][label] = entry
        print(f"\n{label}: probe of {len(pairs)} pairs took {seconds:.1f} s")
        print("layer  grad-norm  relative")
        for i in range(layers):
            print(f"{i:5d}  {grad[i]:9.4f}  {rel[i]:.3e}")
        print("picks:", entry["pick"])

    # stability: does each half of the edits pick the same layer? (down_proj, gradient norm)
    trainable = select_trainable(names, SETS["mlp.down_proj"], None, "benchmark")
    half = len(records) // 2
    halves = []
    for part in (records[:half], records[half:]):
        part_pairs = [p for r in part for p in training_pairs(tok, fmt, r.prompt, r.target)]
        s = probe_layer_scores(model, part_pairs, trainable, pad_id=pad, batch_size=args.batch_size)
        top3 = sorted(range(len(s)), key=lambda i: -s[i])[:3]
        halves.append({"edits": len(part), "pick": list(best_window(s, 1)), "top3": top3, "scores": s})
    out["halves"] = halves
    print("\nhalves (down_proj):", [(h["edits"], h["pick"], h["top3"]) for h in halves])

    # baseline in the same run: one AdamW step on a batch of 10 edits' pairs over every MLP matrix
    trainable = select_trainable(names, SETS["mlp (gate, up, down)"], None, "benchmark")
    for n, p in model.named_parameters():
        p.requires_grad_(n in set(trainable))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    batch = pad_batch(pairs[:20], pad)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    out["train_step_seconds_batch10"] = sorted(times)[1]
    print(f"\none training step (10 edits, {len(batch['input_ids'])} pairs, every MLP): {out['train_step_seconds_batch10']:.2f} s (median of 3)")
    if args.train_check:
        # does the probe's pick learn faster? one layer's down_proj at a time, from the same base weights
        check_pairs = [p for r in records[:20] for p in training_pairs(tok, fmt, r.prompt, r.target)]
        check = pad_batch(check_pairs, pad)
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        out["train_check"] = {}
        for layer in [int(x) for x in args.train_check.split(",")]:
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            for n, p in model.named_parameters():
                p.requires_grad_(n == name)
            param = dict(model.named_parameters())[name]
            opt = torch.optim.Adam([param], lr=5e-4)
            losses = []
            for _ in range(args.check_steps):
                loss = model(input_ids=check["input_ids"], attention_mask=check["attention_mask"], labels=check["labels"]).loss
                losses.append(float(loss.detach()))
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                losses.append(float(model(input_ids=check["input_ids"], attention_mask=check["attention_mask"], labels=check["labels"]).loss))
                param.copy_(saved[name])
            out["train_check"][layer] = losses
            print(f"layer {layer:2d} down_proj alone, answer loss over {args.check_steps} Adam steps: {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"CPU: {out['cpu']}, torch threads {out['threads']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
