"""Robust supervised fine-tuning: train until every edit is learned, with three loops and a loss threshold.

    for epoch in 1..max_epochs:                  # loop 1: passes over the edits
        for batch in shuffled(edits):            # loop 2: batches of edits
            for step in 1..max_steps_per_batch:  # loop 3: stay on a batch until it is learned
                losses = answer-token cross-entropy of each edit still in the batch
                drop every edit whose loss < loss_threshold from the batch for the rest of the epoch
                if the batch is empty: break     # every edit of the batch is learned
                loss = mean(losses of the edits left)
                loss.backward(); optimizer.step()
        if every edit's loss < loss_threshold: break

`schedule: breadth-first` (LocFT-BF) is the same loop with one step per batch: epochs over shuffled mini-batches.
Both schedules share one mechanism (`EpochPool`): a learned edit leaves the pool for the rest of its epoch and gets
no gradient, but the check after every epoch measures every edit again.

The baselines are the same loop with other settings: FT-L (every layer, one step per batch, no threshold) and FT-M
(one layer's MLP down projection, answer-token loss, one step per batch). Only the chosen parameters get gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .forward import FullForward, training_forward
from .tokens import length_buckets, pad_batch


@dataclass(frozen=True)
class TrainingExample:
    case_id: str
    prompt_ids: list[int]
    answer_ids: list[int]


@dataclass
class TrainSettings:
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    batch_size: int = 10
    max_epochs: int = 10
    max_steps_per_batch: int = 25
    loss_threshold: float = 0.05
    seed: int = 0
    schedule: str = "depth-first"  # depth-first: up to max_steps_per_batch steps on a batch; breadth-first: one step


@dataclass
class EditOutcome:
    case_id: str
    final_loss: float
    steps: int
    learned: bool


@dataclass
class TrainReport:
    edits: list[EditOutcome]
    steps: int
    epochs: int
    seconds: float
    trainable_tensors: list[str]
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)  # batch loss at every optimizer step
    forward: str = ""  # which forward path ran (frozen-prefix cache or full forward, and why)
    precision: str = "float32"
    tokens: int = 0  # tokens through the trained layers, summed over steps
    profile: dict = field(default_factory=dict)  # seconds in prefix, forward, backward, optimizer, measure

    @property
    def learned_fraction(self) -> float:
        return sum(e.learned for e in self.edits) / max(len(self.edits), 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["learned_fraction"] = self.learned_fraction
        return d


ProgressFn = Callable[[int, int, float, int], None]  # (edits learned, total edits, last loss, steps)
StepHook = Callable[[int, list[str]], None]  # (step, case ids whose examples contributed to this step's loss)


def _make_optimizer(params, s: TrainSettings):
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def mark_trainable(module, trainable: list[str]) -> dict:
    """Only the chosen parameters get gradients (and optimizer state); returns the module's parameters by name."""
    named = dict(module.named_parameters())
    wanted = set(trainable)
    for name, p in named.items():
        p.requires_grad_(name in wanted)
    return named


_PRECISION_CHOICE: dict[str, tuple[str, str]] = {}


def pick_precision(device: torch.device, size: int = 512, repeats: int = 6) -> tuple[str, str]:
    """`rsft.precision: auto`: bfloat16 autocast where this processor/GPU multiplies bf16 clearly faster than float32
    (measured: a float32 vs a bf16 matmul, best of `repeats`), else float32. Returns (choice, why); measured once.

    The choice is per machine, so a bf16 run's numbers are deterministic on one machine but differ across machines.
    """
    key = str(device)
    if key in _PRECISION_CHOICE:
        return _PRECISION_CHOICE[key]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        _PRECISION_CHOICE[key] = ("float32", "the GPU has no bf16 support")
        return _PRECISION_CHOICE[key]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)

    def best(x, y) -> float:
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(4):
                x @ y
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times)

    try:
        fp32 = best(a, b)
        bf16 = best(a.bfloat16(), b.bfloat16())
    except RuntimeError as exc:  # no bf16 matmul on this device
        _PRECISION_CHOICE[key] = ("float32", f"bf16 matmul failed ({exc})")
        return _PRECISION_CHOICE[key]
    ratio = fp32 / max(bf16, 1e-12)
    choice = "bfloat16" if ratio >= 1.5 else "float32"
    _PRECISION_CHOICE[key] = (choice, f"a {size}x{size} bf16 matmul ran {ratio:.1f}x the float32 speed on {device.type}")
    return _PRECISION_CHOICE[key]


class EpochPool:
    """The edits still in play in this epoch: a learned edit (every one of its examples below the threshold) leaves
    for the rest of the epoch and gets no gradient. The one mechanism of both schedules (depth- and breadth-first)."""

    def __init__(self, case_of: list[str], threshold: float) -> None:
        self.case_of = case_of
        self.threshold = threshold
        self.learned: set[str] = set()

    def new_epoch(self) -> None:
        self.learned.clear()

    def active(self, indices: list[int]) -> list[int]:
        return [i for i in indices if self.case_of[i] not in self.learned]

    def update(self, indices: list[int], losses: list[float]) -> list[bool]:
        """Record the losses just measured for `indices`; returns which of them still train (their edit is unlearned)."""
        worst: dict[str, float] = {}
        for i, v in zip(indices, losses):
            c = self.case_of[i]
            worst[c] = max(worst.get(c, -math.inf), v)
        if self.threshold > 0:
            self.learned.update(c for c, v in worst.items() if v < self.threshold)
        return [self.case_of[i] not in self.learned for i in indices]


def train_edits(
    model,
    examples: list[TrainingExample],
    trainable: list[str],
    settings: TrainSettings,
    *,
    pad_id: int,
    device: torch.device,
    progress: Optional[ProgressFn] = None,
    accelerator=None,
    precision: str = "float32",
    forward=None,
    on_step: Optional[StepHook] = None,
) -> TrainReport:
    """Fine-tune `trainable` parameters of `model` in place until the edits are learned (or the loops run out).

    `forward` (from `training_forward`) may be passed in to keep its frozen-prefix cache across calls (chained
    sequential batches, replayed edits); it rebuilds itself when a layer below the lowest trained one changed.
    Under `accelerator` (several processes), `model` is the DDP-wrapped model, prepared once by the caller after
    `mark_trainable`; each process trains on its share of every batch (full forward).
    """
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    module = accelerator.unwrap_model(model) if accelerator is not None else model
    named = mark_trainable(module, trainable)
    params = [named[n] for n in trainable]
    optimizer = _make_optimizer(params, settings)
    if accelerator is not None:
        optimizer = accelerator.prepare_optimizer(optimizer)
    model.train()
    precision_note = precision
    if precision == "auto":
        precision, why = pick_precision(device)
        precision_note = f"auto -> {precision} ({why})"
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    if forward is None:
        forward = training_forward(model, trainable, accelerator) if accelerator is None else FullForward(model, "several processes: DDP needs its own forward")
    prefix_before = forward.prefix_seconds
    with torch.autocast(device.type, dtype=half, enabled=half is not None):
        forward.prepare(examples, pad_id, device)
    timing = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "measure": 0.0}
    tokens = [0]

    def losses_of(indices: list[int], count: bool = True) -> torch.Tensor:
        """Per-example losses of `indices` (in that order), computed in length buckets so padding stays small."""
        out: list[Optional[torch.Tensor]] = [None] * len(indices)
        lengths = [len(examples[i].prompt_ids) + len(examples[i].answer_ids) for i in indices]
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            for bucket in length_buckets(lengths):
                chosen = [indices[j] for j in bucket]
                b = pad_batch([(examples[i].prompt_ids, examples[i].answer_ids) for i in chosen], pad_id)
                b = {k: v.to(device) for k, v in b.items()}
                b["keys"] = [tuple(examples[i].prompt_ids) + tuple(examples[i].answer_ids) for i in chosen]
                tokens[0] += int(b["attention_mask"].sum()) if count else 0
                values = forward.losses(b, chosen)
                for r, j in enumerate(bucket):
                    out[j] = values[r]
        return torch.stack(out)  # type: ignore[arg-type]

    case_ids = list(dict.fromkeys(e.case_id for e in examples))
    by_case: dict[str, list[int]] = {c: [] for c in case_ids}
    for i, e in enumerate(examples):
        by_case[e.case_id].append(i)
    steps_per_case = {c: 0 for c in case_ids}
    last_loss = {c: math.inf for c in case_ids}
    gen = torch.Generator().manual_seed(settings.seed)
    total_steps, losses, epochs = 0, [], 0
    pool = EpochPool([e.case_id for e in examples], settings.loss_threshold)
    steps_per_batch = 1 if settings.schedule == "breadth-first" else settings.max_steps_per_batch

    def measure_all() -> None:
        """Each edit's loss: the worst of its examples, measured without training (every edit, learned or not)."""
        t = time.perf_counter()
        model.eval()
        per_example: list[float] = []
        with torch.no_grad():
            for start in range(0, len(examples), 64):
                per_example += losses_of(list(range(start, min(start + 64, len(examples)))), count=False).tolist()
        for c, indices in by_case.items():
            last_loss[c] = max(per_example[i] for i in indices)
        model.train()
        timing["measure"] += time.perf_counter() - t

    for epoch in range(settings.max_epochs):
        epochs = epoch + 1
        pool.new_epoch()
        order = torch.randperm(len(case_ids), generator=gen).tolist()
        for start in range(0, len(order), settings.batch_size):
            # a batch holds batch_size edits with all their training examples (chat and raw forms, paraphrases)
            idx = [i for c in order[start : start + settings.batch_size] for i in by_case[case_ids[c]]]
            if accelerator is not None and len(idx) >= accelerator.num_processes:
                idx = idx[accelerator.process_index :: accelerator.num_processes]  # this process's share of the batch
            for _ in range(steps_per_batch):
                # under several processes every process keeps its whole share (steps stay in step); learned examples
                # are masked out of the loss instead
                live = pool.active(idx) if accelerator is None else idx
                if not live:
                    break
                t = time.perf_counter()
                per_example = losses_of(live)
                keep = pool.update(live, per_example.detach().tolist())
                weights = torch.tensor(keep, dtype=per_example.dtype, device=per_example.device)
                n_keep = weights.sum()
                if accelerator is not None:
                    n_keep = accelerator.reduce(n_keep, "sum")
                timing["forward"] += time.perf_counter() - t
                if float(n_keep) == 0:
                    break
                loss = (per_example * weights).sum() / n_keep.clamp_min(1) * (accelerator.num_processes if accelerator is not None else 1)
                value = float(loss.detach())
                t = time.perf_counter()
                (accelerator.backward(loss) if accelerator is not None else loss.backward())
                timing["backward"] += time.perf_counter() - t
                t = time.perf_counter()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # no gradient memory held between steps
                timing["optimizer"] += time.perf_counter() - t
                total_steps += 1
                losses.append(value)
                trained_cases = list(dict.fromkeys(examples[i].case_id for i, k in zip(live, keep) if k))
                for c in trained_cases:
                    steps_per_case[c] += 1
                if on_step:
                    on_step(total_steps, trained_cases)
                if progress:
                    progress(sum(v < settings.loss_threshold for v in last_loss.values()), len(case_ids), value, total_steps)
        measure_all()
        if progress:
            progress(sum(v < settings.loss_threshold for v in last_loss.values()), len(case_ids), losses[-1] if losses else 0.0, total_steps)
        if settings.loss_threshold > 0 and all(v < settings.loss_threshold for v in last_loss.values()):
            break
    model.eval()
    edits = [EditOutcome(c, last_loss[c], steps_per_case[c], last_loss[c] < settings.loss_threshold) for c in case_ids]
    return TrainReport(
        edits=edits,
        steps=total_steps,
        epochs=epochs,
        seconds=time.perf_counter() - started,
        trainable_tensors=list(trainable),
        trainable_parameters=sum(named[n].numel() for n in trainable),
        losses=losses,
        forward=forward.describe(),
        precision=precision_note,
        tokens=tokens[0],
        profile={"prefix": forward.prefix_seconds - prefix_before + 0.0, **timing},
    )
