"""`layers: auto`: pick the window of layers to train from a cheap probe of the edit batch.

The probe is the per-layer gradient norm of the answer loss over the matrices that would train:

    score[L] = || d mean_answer_loss / d theta_L ||_2     theta_L = the trainable tensors of layer L (e.g. its MLP)

computed with one forward and one backward pass per probe mini-batch on the unedited model (no optimizer step, no
``.grad`` left behind, the model's ``requires_grad`` flags restored). The window is the ``width`` consecutive layers
with the largest summed score; ties go to the earliest window, so the choice is deterministic.

Why the gradient norm rather than causal tracing (ROME's restoration of the subject's last token): it measures the
quantity training will actually follow (the first step of fine-tuning moves layer L by lr * score[L] under SGD),
it is over exactly the tensors the recipe trains (attention or MLP alike), it needs no subject span (user datasets
often have none) and it costs one backward pass per probe batch instead of layers x noise-samples forward passes.
Its known bias is towards layers whose activations are large; ``score="relative"`` divides by the layer's weight
norm (||grad|| / ||theta||) for a scale-free comparison. benchmarks/layer_probe.py prints both on SmolLM2-135M.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Sequence

import torch

from ..core.errors import MergeEditError
from ..io.architecture import parse_layer_name
from .forward import masked_modules, position_mask, updates_only_at
from .tokens import model_inputs, pad_batch

__all__ = ["LayerChoice", "probe_layer_scores", "best_window", "choose_layers"]


@dataclass(frozen=True)
class LayerChoice:
    """The chosen window ``[start, end)`` (the form of a recipe's ``rsft.layers``) and the probe's per-layer scores."""

    window: tuple[int, int]
    scores: list[float]  # one per layer index 0..n-1; 0.0 for a layer with no trainable tensor
    score: str  # "grad" | "relative"
    examples: int  # how many (prompt, answer) pairs the probe read

    def to_json(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window)
        return d

    def describe(self) -> str:
        """One line for `mergeedit plan`: the window and the scores, the chosen layers marked."""
        cells = [f"{'*' if self.window[0] <= i < self.window[1] else ''}{i}:{s:.3g}" for i, s in enumerate(self.scores)]
        return f"layers auto -> [{self.window[0]}, {self.window[1]}) by {self.score} norm over {self.examples} examples ({' '.join(cells)})"


def _answer_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over examples of each example's mean answer-token cross-entropy."""
    logits = model(**model_inputs(model, {k: batch[k] for k in ("input_ids", "attention_mask")})).logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return (ce.sum(1) / (labels != -100).sum(1).clamp_min(1)).sum()


def probe_layer_scores(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    trainable: Sequence[str],
    *,
    pad_id: int = 0,
    batch_size: int = 16,
    score: Literal["grad", "relative"] = "grad",
    device: Optional[torch.device] = None,
    positions: Optional[Sequence[Optional[Sequence[int]]]] = None,
) -> list[float]:
    """Per-layer norm of the gradient of the mean answer loss over ``pairs`` ((prompt ids, answer ids) each) with
    respect to the ``trainable`` tensors (parameter names) of each layer. Index i of the list is layer i.

    ``positions`` (one per pair; None for every position): the positions whose activations may move the trained
    weights (`rsft.update_positions`), masked exactly as training masks them (forward.updates_only_at), so the probe
    measures the gradient the masked training step follows."""
    if score not in ("grad", "relative"):
        raise MergeEditError(f"layer probe score must be 'grad' or 'relative', got {score!r}")
    if not pairs:
        raise MergeEditError("layers: auto needs at least one edit to probe")
    if positions is not None and len(positions) != len(pairs):
        raise MergeEditError(f"layer probe: {len(positions)} position lists for {len(pairs)} examples")
    named = dict(model.named_parameters())
    by_layer: dict[int, list[str]] = {}
    for name in trainable:
        parsed = parse_layer_name(name)
        if name not in named:
            raise MergeEditError(f"layer probe: trainable tensor '{name}' is not a parameter of the model")
        if parsed is not None:
            by_layer.setdefault(parsed.index, []).append(name)
    if not by_layer:
        raise MergeEditError(f"layers: auto needs trainable tensors inside numbered layers; {list(trainable)[:3]} are not")
    names = [n for layer in sorted(by_layer) for n in by_layer[layer]]
    params = [named[n] for n in names]
    device = device or params[0].device
    flags = {n: p.requires_grad for n, p in named.items()}
    was_training = model.training
    grads = [torch.zeros_like(p) for p in params]
    modules = masked_modules(model, names) if positions is not None and any(p is not None for p in positions) else []
    try:
        for p in named.values():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        for start in range(0, len(pairs), batch_size):
            chunk = [(list(p), list(a)) for p, a in pairs[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_id).items()}
            masked = contextlib.nullcontext()
            if modules:
                mask = position_mask(positions[start : start + batch_size], [len(p) + len(a) for p, a in chunk], batch["input_ids"].shape[1])
                masked = updates_only_at(modules, mask.to(device))
            with masked:
                loss = _answer_loss_sum(model, batch) / len(pairs)
            for acc, g in zip(grads, torch.autograd.grad(loss, params)):
                acc += g
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    scores = [0.0] * (max(by_layer) + 1)
    for layer in by_layer:
        idx = [names.index(n) for n in by_layer[layer]]
        g2 = sum(float(grads[i].double().pow(2).sum()) for i in idx)
        value = g2**0.5
        if score == "relative":
            w2 = sum(float(params[i].detach().double().pow(2).sum()) for i in idx)
            value = value / w2**0.5 if w2 > 0 else 0.0
        scores[layer] = value
    return scores


def best_window(scores: Sequence[float], width: int) -> tuple[int, int]:
    """``[start, start + width)`` with the largest summed score; the earliest of equal windows."""
    if not 1 <= width <= len(scores):
        raise MergeEditError(f"layers: auto window width must be between 1 and the {len(scores)} layers, got {width}")
    best, best_sum = 0, None
    for start in range(len(scores) - width + 1):
        total = sum(scores[start : start + width])
        if best_sum is None or total > best_sum:
            best, best_sum = start, total
    return best, best + width


def choose_layers(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    trainable: Sequence[str],
    *,
    width: int = 1,
    pad_id: int = 0,
    batch_size: int = 16,
    max_examples: Optional[int] = 100,
    score: Literal["grad", "relative"] = "grad",
    device: Optional[torch.device] = None,
    positions: Optional[Sequence[Optional[Sequence[int]]]] = None,
) -> LayerChoice:
    """Probe the first ``max_examples`` pairs and return the best ``width``-layer window with every layer's score.

    ``trainable``: the tensors the recipe would train in ALL layers (e.g. select_trainable(..., layers=None)); the
    run then trains those inside the window only.
    """
    used = list(pairs[:max_examples] if max_examples else pairs)
    kept = None if positions is None else list(positions[: len(used)])
    scores = probe_layer_scores(model, used, trainable, pad_id=pad_id, batch_size=batch_size, score=score, device=device, positions=kept)
    return LayerChoice(best_window(scores, width), scores, score, len(used))
