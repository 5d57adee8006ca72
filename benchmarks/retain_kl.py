#!/usr/bin/env python
"""Cost and fidelity of the retain KL term (mergeedit.editing.retain) on SmolLM2-135M-Instruct.

Run by hand (a few minutes on 2 CPU cores):

    .venv/bin/python benchmarks/retain_kl.py --json retain-kl.json

Measures, in one run:
- building the base side once for the shipped retain set (data/retain/retain.jsonl) at several top-k: seconds and
  bytes held;
- the cost per training step: an R-SFT step on a batch of 10 ZsRE edits (every MLP matrix, AdamW) alone (the
  baseline) and with ``+ retain(model, step)`` for a retain batch of 8 texts, alternated, median of --steps each;
- how much of the full KL the top-k bucketing keeps: after a few edit steps have moved the model, the top-k KL and
  the full KL on the same texts, and the base probability mass outside the top-k.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "data" / "zsre" / "zsre_mend_eval_first1000.json"


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--retain-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--fidelity-texts", type=int, default=24)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeedit.editing.datasets import load_edits
    from mergeedit.editing.prompts import PromptFormat, training_pairs
    from mergeedit.editing.retain import RetainKL, load_retain_texts
    from mergeedit.editing.tokens import pad_batch, pad_token_id
    from mergeedit.editing.trainable import select_trainable
    from mergeedit.models.builtin import materialize

    folder = materialize("smollm2-135m-instruct", dtype="float32")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    retain_texts = load_retain_texts()
    out = {"model": "smollm2-135m-instruct (float32)", "cpu": cpu_model(), "threads": torch.get_num_threads(), "texts": len(retain_texts.texts),
           "max_tokens": args.max_tokens, "retain_batch": args.retain_batch, "build": {}}

    for k in (16, 64, 256):
        t0 = time.perf_counter()
        r = RetainKL.build(model, tok, retain_texts, top_k=k, batch_size=args.retain_batch, max_tokens=args.max_tokens)
        out["build"][k] = {"seconds": time.perf_counter() - t0, "bytes": r.reference_bytes, "positions": r.positions, "batches": len(r),
                           "base_mass_outside_top_k": float(torch.cat([g.rest for g in r.groups]).exp().mean())}
        print(f"build top-{k}: {out['build'][k]['seconds']:.1f} s, {r.reference_bytes / 2**20:.1f} MiB for {r.positions} positions; "
              f"mean base mass outside the top-{k}: {out['build'][k]['base_mass_outside_top_k']:.4f}")
        if k == 64:
            retain = r
    full_bytes = out["build"][64]["positions"] * model.config.vocab_size * 4
    out["full_reference_bytes_would_be"] = full_bytes
    print(f"full distributions would hold {full_bytes / 2**30:.2f} GiB")

    # one R-SFT-like step: 10 edits (raw + chat pairs), every MLP matrix, AdamW
    records = load_edits(DATASET, "zsre", limit=10)
    fmt = PromptFormat.resolve("auto", tok)
    pairs = [p for rec in records for p in training_pairs(tok, fmt, rec.prompt, rec.target)]
    batch = pad_batch(pairs, pad_token_id(tok, model))
    names = [n for n, _ in model.named_parameters()]
    trainable = set(select_trainable(names, [r"mlp\.(gate_proj|up_proj|down_proj)\.weight$"], None, "benchmark"))
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(i: int, with_retain: bool) -> float:
        t0 = time.perf_counter()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        if with_retain:
            loss = loss + retain(model, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    step(0, False)  # warm-up
    alone, mixed = [], []
    for i in range(args.steps):
        alone.append(step(i, False))
        mixed.append(step(i, True))
    out["step_seconds"] = {"edit_only": statistics.median(alone), "edit_plus_retain": statistics.median(mixed), "edit_pairs": len(pairs),
                           "all_alone": alone, "all_mixed": mixed}
    extra = out["step_seconds"]["edit_plus_retain"] / out["step_seconds"]["edit_only"] - 1
    print(f"step (10 edits = {len(pairs)} pairs, every MLP): {out['step_seconds']['edit_only']:.2f} s alone, "
          f"{out['step_seconds']['edit_plus_retain']:.2f} s with the retain term (batch {args.retain_batch}): +{100 * extra:.0f}%")

    # fidelity: base references on a subset, the model as the steps above left it
    model.eval()
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    subset = retain_texts.texts[: args.fidelity_texts]
    with torch.no_grad():
        full = RetainKL.build(base, tok, subset, top_k=None, batch_size=args.retain_batch, max_tokens=args.max_tokens)
        kls = {"full": [float(full.kl(model, i)) for i in range(len(full))]}
        for k in (16, 64, 256):
            r = RetainKL.build(base, tok, subset, top_k=k, batch_size=args.retain_batch, max_tokens=args.max_tokens)
            kls[k] = [float(r.kl(model, i)) for i in range(len(r))]
    out["fidelity"] = {str(k): statistics.fmean(v) for k, v in kls.items()}
    for k in (16, 64, 256):
        print(f"KL after {2 * args.steps + 1} edit steps, top-{k}: {out['fidelity'][str(k)]:.5f} nats = {out['fidelity'][str(k)] / out['fidelity']['full']:.3f} of the full {out['fidelity']['full']:.5f}")
    print(f"CPU: {out['cpu']}, torch threads {out['threads']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
