#!/usr/bin/env python
"""R-SFT training throughput: mergeedit's training loop against a plain Hugging Face loop, measured in the same run.

For each model (SmolLM2-135M-Instruct, the built-in `smollm2-135m-instruct`, and a tiny random Llama with SmolLM2's
tokenizer; or a random ~1B Llama shape for a GPU), on the first N edits of the recipe's dataset, with the recipe's
R-SFT settings (trainable set, prompt form, lr, optimizer, batch size, loss threshold; epochs and steps per batch
capped by --max-epochs / --max-steps so a run stays short):

1. baseline, a plain Hugging Face loop: the same examples (the same token sequences mergeedit trains on), the same
   edit batches in the same order, each batch right-padded to its longest member, `model(input_ids, attention_mask,
   labels=...)` (every layer, full-vocabulary logits at every position), `loss.backward()`, the same optimizer's
   `step()` and `zero_grad()`, max-steps steps on every batch of every epoch (one under `schedule: breadth-first`,
   as the recipe's own loop), no caching, no early exit;
2. mergeedit's `train_edits` from the same initial weights: frozen-prefix cache, length buckets, logits at answer
   positions only, learned edits leave their epoch (`EpochPool`), early exit when a batch or the run is learned;
3. the generation-protocol evaluation of the N edits on the trained model (`evaluate_edits`, batched, left-padded,
   greedy with the KV cache), timed, as mergeedit runs it after training.

Printed per model: steps, trained tokens (real tokens of the examples in each step, padding excluded), tokens/s over
the training steps, edits/min over the whole training call, the share of edits learned at the end (each edit's loss
measured the same way for both), peak RSS (and GPU memory) of each phase, and the share of mergeedit's time in
prefix / forward / backward / optimizer / measure (the end-of-epoch check) / evaluation. Ratios are mergeedit over
the baseline of the same run; on a shared machine re-run and compare the ratios, not the seconds.

    .venv/bin/python benchmarks/edit_throughput.py                                    # tiny + SmolLM2, 40 edits
    .venv/bin/python benchmarks/edit_throughput.py --models smollm2 --edits 40 --max-steps 3
    .venv/bin/python benchmarks/edit_throughput.py --recipe recipes/demo.yaml --models tiny --max-epochs 2
    .venv/bin/python benchmarks/edit_throughput.py --layers 6 9                       # a window: frozen-prefix cache
    .venv/bin/python benchmarks/edit_throughput.py --models llama-1b --device cuda    # ~1B random Llama on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergeedit.editing.forward import FullForward  # noqa: E402
from mergeedit.editing.prompts import PromptFormat  # noqa: E402
from mergeedit.editing.rsft import TrainingExample, mark_trainable, pick_precision, train_edits  # noqa: E402
from mergeedit.editing.tokens import length_buckets, pad_batch  # noqa: E402
from mergeedit.editing.trainable import select_trainable  # noqa: E402
from mergeedit.evaluation.evaluate import evaluate_edits  # noqa: E402
from mergeedit.models.loading import load_model_and_tokenizer, pick_device, resolve_base_folder  # noqa: E402
from mergeedit.pipeline.run_dir import reset_peak_rss, stage_peak_rss  # noqa: E402
from mergeedit.pipeline.runner import RecipeRun, examples_for, train_settings  # noqa: E402

GIB = 2**30


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- models ------------------------------------------------------------------------------------------------------------
def load_model(kind: str, dtype: str, device: torch.device):
    """(model, tokenizer, description). Every kind uses SmolLM2's tokenizer, so the examples are the same tokens."""
    folder = resolve_base_folder("smollm2-135m-instruct", ROOT, dtype)
    model, tokenizer = load_model_and_tokenizer(folder, dtype, device)
    if kind == "smollm2":
        return model, tokenizer, "SmolLM2-135M-Instruct (built-in smollm2-135m-instruct)"
    from transformers import LlamaConfig, LlamaForCausalLM

    base = model.config
    if kind == "tiny":
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    elif kind == "llama-1b":  # TinyLlama-1.1B's shape with SmolLM2's vocabulary: ~1.2B random parameters
        shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)
    else:
        raise SystemExit(f"--models: unknown model {kind!r}; use tiny, smollm2 or llama-1b")
    cfg = LlamaConfig(
        vocab_size=base.vocab_size, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, **shape
    )
    del model
    torch.manual_seed(0)
    built = LlamaForCausalLM(cfg).to(dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]).to(device).eval()
    for p in built.parameters():
        p.requires_grad_(False)
    n = sum(p.numel() for p in built.parameters())
    return built, tokenizer, f"random Llama {kind} ({n / 1e6:.0f}M parameters, {shape['num_hidden_layers']} layers, SmolLM2 tokenizer)"


# -- measurement helpers -----------------------------------------------------------------------------------------------
class Peak:
    """Peak RSS (VmHWM since reset) and peak GPU memory of one phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        import gc

        gc.collect()
        try:  # hand memory freed by the previous phase back to the OS, so it does not count in this phase's peak
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        self.rss = stage_peak_rss()
        self.gpu = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def edit_losses(model, examples: list[TrainingExample], pad_id: int, device) -> dict[str, float]:
    """Each edit's loss (the worst of its examples), full forward under no_grad: one yardstick for both loops."""
    forward = FullForward(model, "yardstick")
    per: dict[str, float] = {}
    model.eval()
    with torch.no_grad():
        for bucket in length_buckets([len(e.prompt_ids) + len(e.answer_ids) for e in examples], max_rows=32):
            b = pad_batch([(examples[i].prompt_ids, examples[i].answer_ids) for i in bucket], pad_id)
            values = forward.losses({k: v.to(device) for k, v in b.items()}, bucket).tolist()
            for i, v in zip(bucket, values):
                c = examples[i].case_id
                per[c] = max(per.get(c, -math.inf), v)
    return per


def plain_loop(model, examples, trainable, settings, pad_id, device, half) -> dict:
    """The baseline: a plain Hugging Face training loop over the same batches (see the module doc)."""
    named = mark_trainable(model, trainable)
    params = [named[n] for n in trainable]
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}.get(settings.optimizer, torch.optim.AdamW)
    optimizer = opt_cls(params, lr=settings.lr, weight_decay=settings.weight_decay)
    case_ids = list(dict.fromkeys(e.case_id for e in examples))
    by_case: dict[str, list[int]] = {c: [] for c in case_ids}
    for i, e in enumerate(examples):
        by_case[e.case_id].append(i)
    gen = torch.Generator().manual_seed(settings.seed)
    timing = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    steps = tokens = 0
    model.train()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(settings.max_epochs):
        order = torch.randperm(len(case_ids), generator=gen).tolist()
        for start in range(0, len(order), settings.batch_size):
            idx = [i for c in order[start : start + settings.batch_size] for i in by_case[case_ids[c]]]
            b = pad_batch([(examples[i].prompt_ids, examples[i].answer_ids) for i in idx], pad_id)
            b = {k: v.to(device) for k, v in b.items()}
            for _ in range(1 if settings.schedule == "breadth-first" else settings.max_steps_per_batch):  # the recipe's schedule
                t = time.perf_counter()
                with torch.autocast(device.type, dtype=half, enabled=half is not None):
                    loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False).loss
                sync(device)
                timing["forward"] += time.perf_counter() - t
                t = time.perf_counter()
                loss.backward()
                sync(device)
                timing["backward"] += time.perf_counter() - t
                t = time.perf_counter()
                optimizer.step()
                optimizer.zero_grad()
                sync(device)
                timing["optimizer"] += time.perf_counter() - t
                steps += 1
                tokens += int(b["attention_mask"].sum())
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    model.eval()
    return {"steps": steps, "tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "profile": timing}


def warm_up(model, examples, trainable, pad_id, device, half) -> None:
    """One untimed forward + backward (first-call allocations and kernel selection), gradients then dropped."""
    mark_trainable(model, trainable)
    b = pad_batch([(e.prompt_ids, e.answer_ids) for e in examples[:8]], pad_id)
    with torch.autocast(device.type, dtype=half, enabled=half is not None):
        model(**{k: v.to(device) for k, v in b.items()}, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)


def restore(model, saved: Path) -> None:
    """Put back the trainable tensors saved before the first loop (kept on disk: a copy in memory would count in
    every phase's peak RSS)."""
    from safetensors.torch import load_file

    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(saved).items():
            named[n].copy_(t)
            named[n].grad = None


# -- one model ---------------------------------------------------------------------------------------------------------
def bench_model(kind: str, args, recipe_run: RecipeRun) -> dict:
    recipe = recipe_run.recipe
    device = pick_device(args.device)
    model, tokenizer, description = load_model(kind, recipe.model.dtype, device)
    settings, patterns, layers = train_settings(recipe)
    if args.layers:
        layers = tuple(args.layers)
    elif recipe.rsft.method == "locft-bf" and layers is None:
        n = len(model.model.layers)
        layer = min(max(round(0.2 * n), 0), n - 1)
        layers = (layer, layer + 1)
    if args.max_epochs is not None:
        settings.max_epochs = args.max_epochs
    if args.max_steps is not None:
        settings.max_steps_per_batch = args.max_steps
    if args.batch_size is not None:
        settings.batch_size = args.batch_size
    trainable = select_trainable([n for n, _ in model.named_parameters()], patterns, layers, "--recipe rsft.trainable")
    if not trainable:
        raise SystemExit(f"{kind}: the recipe's trainable patterns {patterns} (layers {layers}) match no parameter of this model")
    records = recipe_run.load_records()[: args.edits]
    fmt = PromptFormat.resolve(recipe.dataset.prompt, tokenizer)
    examples = examples_for(records, tokenizer, fmt, recipe.rsft.train_rephrases, "dataset", system_prompt=recipe.dataset.system_prompt, eos=recipe.rsft.eos)
    pad_id = tokenizer.pad_token_id
    precision = args.precision or recipe.rsft.precision
    compiled = args.compile or str(recipe.rsft.compile).lower()
    resolved = pick_precision(device)[0] if precision == "auto" else precision
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(resolved)
    named = dict(model.named_parameters())
    import tempfile

    from safetensors.torch import save_file

    scratch = tempfile.TemporaryDirectory(prefix="edit-throughput-")
    initial = Path(scratch.name) / "initial.safetensors"
    save_file({n: named[n].detach().to("cpu").contiguous() for n in trainable}, initial)
    row: dict = {
        "model": description,
        "edits": len(records),
        "examples": len(examples),
        "tokens_per_example": sum(len(e.prompt_ids) + len(e.answer_ids) for e in examples) / len(examples),
        "trainable": f"{len(trainable)} tensors, {sum(named[n].numel() for n in trainable) / 1e6:.1f}M parameters",
        "settings": {"max_epochs": settings.max_epochs, "max_steps_per_batch": settings.max_steps_per_batch, "batch_size": settings.batch_size, "lr": settings.lr, "optimizer": settings.optimizer, "loss_threshold": settings.loss_threshold, "schedule": settings.schedule, "precision": precision, "compile": compiled},
    }
    print(f"\n== {description}: {row['edits']} edits, {row['examples']} examples ({row['tokens_per_example']:.1f} tokens each), trainable {row['trainable']}", flush=True)

    warm_up(model, examples, trainable, pad_id, device, half)
    # 1. the plain Hugging Face loop
    with Peak(device) as peak:
        base = plain_loop(model, examples, trainable, settings, pad_id, device, half)
    losses = edit_losses(model, examples, pad_id, device)
    base.update(peak_rss=peak.rss, peak_gpu=peak.gpu, learned=sum(v < settings.loss_threshold for v in losses.values()) / len(losses))
    print(f"plain HF loop: {base['steps']} steps, {base['seconds']:.1f} s", flush=True)
    restore(model, initial)

    # 2. mergeedit's R-SFT from the same weights
    with Peak(device) as peak:
        t, cpu = time.perf_counter(), time.process_time()
        # every edit is new, as a sequential batch's own edits are in the pipeline (fresh: not measured before epoch 1)
        report = train_edits(model, examples, trainable, settings, pad_id=pad_id, device=device, precision=precision, fresh={e.case_id for e in examples}, compiled=compiled)
        sync(device)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    losses = edit_losses(model, examples, pad_id, device)
    ours = {
        "steps": report.steps,
        "epochs": report.epochs,
        "tokens": report.tokens,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "profile": report.profile,
        "forward_path": report.forward,
        "precision": report.precision,
        "compiled": report.compiled,
        "peak_rss": peak.rss,
        "peak_gpu": peak.gpu,
        "learned": sum(v < settings.loss_threshold for v in losses.values()) / len(losses),
        "learned_by_own_check": report.learned_fraction,
    }
    print(f"mergeedit R-SFT: {ours['steps']} steps, {seconds:.1f} s ({report.forward}; precision {report.precision}; compiled {report.compiled})", flush=True)

    # 3. the generation-protocol evaluation of the trained model, as the run's eval stage does it
    if args.eval:
        with Peak(device) as peak:
            t = time.perf_counter()
            evaluate_edits(model, tokenizer, records, generation=True, chat_template=fmt.uses_chat, batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens)
            sync(device)
            ours["evaluation_seconds"] = time.perf_counter() - t
        ours["evaluation_peak_rss"] = peak.rss
        print(f"evaluation (teacher-forced + generation, batch {recipe.eval.batch_size}): {ours['evaluation_seconds']:.1f} s", flush=True)

    for side in (base, ours):
        step_time = sum(v for k, v in side["profile"].items() if k in ("prefix", "forward", "backward", "optimizer"))
        side["tokens_per_s"] = side["tokens"] / step_time if step_time else 0.0
        side["edits_per_min"] = row["edits"] / side["seconds"] * 60
        side["tokens_per_cpu_s"] = side["tokens"] / side["cpu_seconds"]  # over the whole call: the figure least moved by other processes
    row["baseline"], row["mergeedit"] = base, ours
    row["ratio_tokens_per_cpu_s"] = ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
    row["ratio_edits_per_cpu_min"] = base["cpu_seconds"] / ours["cpu_seconds"]
    row["ratio_tokens_per_s"] = ours["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
    row["ratio_edits_per_min"] = ours["edits_per_min"] / base["edits_per_min"]
    del model
    scratch.cleanup()
    return row


# -- report ------------------------------------------------------------------------------------------------------------
def print_table(rows: list[dict], device: torch.device) -> None:
    mem = "peak GPU GiB" if device.type == "cuda" else "peak RSS GiB"
    print(f"\n| model | loop | steps | tokens | wall s | CPU s | tokens/s | edits/min | learned | {mem} | ratio tokens/s | ratio edits/min | ratio tokens/CPU-s | ratio edits/CPU-min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for name, side in (("plain HF loop", row["baseline"]), ("mergeedit R-SFT", row["mergeedit"])):
            peak = side["peak_gpu"] if device.type == "cuda" else side["peak_rss"]
            ours = side is row["mergeedit"]
            ratios = [row[k] for k in ("ratio_tokens_per_s", "ratio_edits_per_min", "ratio_tokens_per_cpu_s", "ratio_edits_per_cpu_min")] if ours else [1.0] * 4
            print(
                f"| {row['model'].split(' (')[0]} | {name} | {side['steps']} | {side['tokens']} | {side['seconds']:.1f} | {side['cpu_seconds']:.1f} | "
                f"{side['tokens_per_s']:.0f} | {side['edits_per_min']:.1f} | {side['learned']:.0%} | {peak / GIB:.2f} | "
                + " | ".join(f"**{r:.2f}x**" if ours else "1" for r in ratios)
                + " |"
            )
    print("\nshare of mergeedit's time (training call + evaluation):")
    for row in rows:
        ours = row["mergeedit"]
        parts = dict(ours["profile"])
        if "evaluation_seconds" in ours:
            parts["evaluation"] = ours["evaluation_seconds"]
        total = ours["seconds"] + ours.get("evaluation_seconds", 0.0)
        other = total - sum(parts.values())
        parts["other"] = max(other, 0.0)
        shares = ", ".join(f"{k} {v / total:.0%} ({v:.1f} s)" for k, v in parts.items())
        print(f"  {row['model'].split(' (')[0]}: {shares}; forward path: {ours['forward_path']}; precision {ours['precision']}")
        base = row["baseline"]
        bshares = ", ".join(f"{k} {v / base['seconds']:.0%}" for k, v in base["profile"].items())
        print(f"  {row['model'].split(' (')[0]} plain loop: {bshares}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "zsre-sequential.yaml", help="recipe whose R-SFT settings, dataset and prompt form are used")
    ap.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2, llama-1b (random ~1.2B Llama shape, for a GPU)")
    ap.add_argument("--edits", type=int, default=40)
    ap.add_argument("--max-epochs", type=int, default=1, help="cap on the recipe's rsft.max_epochs (default 1; 0 keeps the recipe's)")
    ap.add_argument("--max-steps", type=int, default=3, help="cap on rsft.max_steps_per_batch (default 3; 0 keeps the recipe's)")
    ap.add_argument("--batch-size", type=int, default=None, help="override rsft.batch_size (edits per batch)")
    ap.add_argument("--layers", type=int, nargs=2, default=None, metavar=("FIRST", "END"), help="train only layers [FIRST, END) of the trainable set")
    ap.add_argument("--precision", default=None, help="override rsft.precision (float32, bfloat16, auto)")
    ap.add_argument("--compile", choices=["auto", "true", "false"], default=None, help="override rsft.compile (the frozen modules compiled with torch.compile)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-eval", dest="eval", action="store_false", help="skip the timed generation-protocol evaluation")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a machine other processes load: spinning thread barriers distort wall times)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.max_epochs == 0:
        args.max_epochs = None
    if args.max_steps == 0:
        args.max_steps = None
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe_run = RecipeRun(args.recipe)
    device = pick_device(args.device)
    where = f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads" + (f"; GPU: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    print(f"recipe {args.recipe}; {where}; torch {torch.__version__}", flush=True)
    rows = [bench_model(kind.strip(), args, recipe_run) for kind in args.models.split(",") if kind.strip()]
    print_table(rows, device)
    print(f"\n{where}; load average {os.getloadavg()[0]:.1f} at the end. Ratios come from one process; on a loaded machine")
    print("trust the CPU-second ratios (process CPU time, whole training call) over the wall-time ones.")
    if args.json:
        args.json.write_text(json.dumps({"recipe": str(args.recipe), "machine": where, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
