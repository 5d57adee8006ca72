"""Robust supervised fine-tuning: train until every edit is learned, with three loops and a loss threshold.

    for epoch in 1..max_epochs:                  # loop 1: passes over the edits
        for batch in shuffled(edits):            # loop 2: batches of edits
            for step in 1..max_steps_per_batch:  # loop 3: stay on a batch until it is learned
                losses = answer-token cross-entropy of each edit in the batch
                if max(losses) < loss_threshold: break  # every edit of the batch is learned
                loss = mean(losses)
                loss.backward(); optimizer.step()
        if every edit's loss < loss_threshold: break

The baselines are the same loop with other settings: FT-L (every layer, one step per batch, no threshold) and FT-M
(one layer's MLP down projection, answer-token loss, one step per batch). Only the chosen parameters get gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .tokens import pad_batch


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

    @property
    def learned_fraction(self) -> float:
        return sum(e.learned for e in self.edits) / max(len(self.edits), 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["learned_fraction"] = self.learned_fraction
        return d


ProgressFn = Callable[[int, int, float, int], None]  # (edits learned, total edits, last loss, steps)


def _make_optimizer(params, s: TrainSettings):
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _per_example_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean answer-token cross-entropy of each example (shape [batch]).

    Only positions from the first answer token on need logits; with a 49k-word vocabulary the output layer is a
    large share of the compute, so models that support it (`logits_to_keep`) compute just those.
    """
    labels = batch["labels"]
    width = labels.shape[1]
    answer_cols = (labels[:, 1:] != -100).any(0).nonzero().flatten()
    first = int(answer_cols.min()) if answer_cols.numel() else 0
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _accepts_logits_to_keep(model):
        logits = model(**kwargs, logits_to_keep=width - first).logits[:, :-1].float()
    else:
        logits = model(**kwargs).logits[:, first:-1].float()
    labels = labels[:, first + 1 :]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(1).clamp_min(1)
    return ce.sum(1) / counts


def mark_trainable(module, trainable: list[str]) -> dict:
    """Only the chosen parameters get gradients (and optimizer state); returns the module's parameters by name."""
    named = dict(module.named_parameters())
    wanted = set(trainable)
    for name, p in named.items():
        p.requires_grad_(name in wanted)
    return named


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
) -> TrainReport:
    """Fine-tune `trainable` parameters of `model` in place until the edits are learned (or the loops run out).

    Under `accelerator` (several processes), `model` is the DDP-wrapped model, prepared once by the caller after
    `mark_trainable`; each process trains on its share of every batch.
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
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)

    def losses_of(batch) -> torch.Tensor:
        """Per-example losses, under autocast when a half precision is asked for (bf16 uses AMX on recent CPUs)."""
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            return _per_example_loss(model, batch)

    def batch_of(indices: list[int]) -> dict[str, torch.Tensor]:
        b = pad_batch([(examples[i].prompt_ids, examples[i].answer_ids) for i in indices], pad_id)
        return {k: v.to(device) for k, v in b.items()}

    case_ids = list(dict.fromkeys(e.case_id for e in examples))
    by_case: dict[str, list[int]] = {c: [] for c in case_ids}
    for i, e in enumerate(examples):
        by_case[e.case_id].append(i)
    steps_per_case = {c: 0 for c in case_ids}
    last_loss = {c: math.inf for c in case_ids}
    gen = torch.Generator().manual_seed(settings.seed)
    total_steps, losses, epochs = 0, [], 0

    def measure_all() -> None:
        """Each edit's loss: the worst of its examples, measured without training."""
        model.eval()
        per_example: list[float] = []
        with torch.no_grad():
            for start in range(0, len(examples), settings.batch_size):
                per_example += losses_of(batch_of(list(range(start, min(start + settings.batch_size, len(examples)))))).tolist()
        for c, indices in by_case.items():
            last_loss[c] = max(per_example[i] for i in indices)
        model.train()

    for epoch in range(settings.max_epochs):
        epochs = epoch + 1
        order = torch.randperm(len(case_ids), generator=gen).tolist()
        for start in range(0, len(order), settings.batch_size):
            # a batch holds batch_size edits with all their training examples (chat and raw forms, paraphrases)
            idx = [i for c in order[start : start + settings.batch_size] for i in by_case[case_ids[c]]]
            if accelerator is not None and len(idx) >= accelerator.num_processes:
                idx = idx[accelerator.process_index :: accelerator.num_processes]  # this process's share of the batch
            batch = batch_of(idx)
            for _ in range(settings.max_steps_per_batch):
                per_example = losses_of(batch)
                loss = per_example.mean()
                worst = per_example.detach().max()
                if accelerator is not None:
                    worst = accelerator.reduce(worst, "max")
                value = float(loss.detach())
                if float(worst) < settings.loss_threshold:
                    break
                optimizer.zero_grad(set_to_none=True)
                (accelerator.backward(loss) if accelerator is not None else loss.backward())
                optimizer.step()
                total_steps += 1
                losses.append(value)
                for i in idx:
                    steps_per_case[examples[i].case_id] += 1
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
    )
