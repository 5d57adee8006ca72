"""The training forward pass: answer-token losses, with the frozen layers below the lowest trained one run once.

When the lowest trainable layer is L, nothing below L changes during training, so the hidden states entering layer L
are a function of the example alone. `PrefixForward` computes them once per example (bucketed, under no_grad; kept
unpadded so they can be re-batched in any order) and every step runs only layers L.. + final norm + the output layer,
the latter only at the positions whose next token is an answer token (no full-vocabulary logits elsewhere).

Supported: Hugging Face decoders shaped like Llama (`model.model.layers`, `.norm`, `.embed_tokens`, `model.lm_head`,
one attention type for every layer, no logit soft-capping). Anything else gets `FullForward`: the model's own forward
with `logits_to_keep` where it accepts it. `describe()` says which path a run took (printed in the run summary).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from ..io.architecture import parse_layer_name
from .tokens import length_buckets, pad_batch


def answer_losses(lm_head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean answer-token cross-entropy per row; `hidden` is the final-norm output [B, T, H], labels -100 off-answer.

    The output layer runs only on the positions that predict an answer token.
    """
    target = labels[:, 1:]
    scored = target != -100
    logits = lm_head(hidden[:, :-1][scored]).float()
    ce = torch.nn.functional.cross_entropy(logits, target[scored], reduction="none")
    rows = scored.nonzero()[:, 0]
    total = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    return total / scored.sum(1).clamp_min(1)


@contextmanager
def updates_only_at(modules: Sequence[torch.nn.Module], mask: torch.Tensor) -> Iterator[None]:
    """While active, the output of each of `modules` ([rows, positions, ...], the batch's padded layout) carries
    gradient only at the positions where `mask` ([rows, positions], bool) is True: elsewhere it is detached, so those
    positions' activations cannot move the module's weights (`rsft.update_positions`). Values are unchanged: the
    forward, and so every loss, is exactly the same."""
    keep = mask.unsqueeze(-1)

    def hook(module, args, out):
        return torch.where(keep, out, out.detach())

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def masked_modules(model, trainable: Sequence[str]) -> list[torch.nn.Module]:
    """The modules whose outputs `updates_only_at` masks for a trained set: those owning a trained tensor inside a
    decoder layer (an embedding, the final norm or the output layer, if trained, learns from every position)."""
    inside = [n for n in trainable if parse_layer_name(n) is not None]
    return list({id(m): m for m in (model.get_submodule(n.rpartition(".")[0]) for n in inside)}.values())


def position_mask(positions: Sequence[Optional[Sequence[int]]], lengths: Sequence[int], width: int) -> torch.Tensor:
    """[rows, width] bool for a right-padded batch: row r keeps `positions[r]` (indices into its prompt + answer), or
    its first `lengths[r]` positions (every real token) where that is None."""
    mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for r, (p, n) in enumerate(zip(positions, lengths)):
        mask[r, list(p) if p is not None else slice(0, n)] = True
    return mask


def lowest_trainable_layer(trainable: Sequence[str], layers: int) -> int:
    """The lowest block index among `trainable`; 0 when an embedding trains, `layers` for a head/final-norm-only set."""
    lowest = layers
    for name in trainable:
        parsed = parse_layer_name(name)
        if parsed is not None:
            lowest = min(lowest, parsed.index)
        elif "embed" in name or "wte" in name or "wpe" in name:
            return 0
    return lowest


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def split_reason(model) -> Optional[str]:
    """None when `model` can be run from a middle layer; else why not (the run summary shows it)."""
    decoder = getattr(model, "model", None)
    for attr in ("layers", "norm", "embed_tokens"):
        if not hasattr(decoder, attr):
            return f"{type(model).__name__} has no model.{attr} (not a Llama-style decoder)"
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        return f"{type(model).__name__} has no linear lm_head"
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        return "the model soft-caps its logits"
    if len(set(getattr(config, "layer_types", None) or ["one"])) > 1:
        return "its layers use different attention types"
    if "inputs_embeds" not in inspect.signature(decoder.forward).parameters:
        return "its decoder takes no inputs_embeds"
    return None


class FullForward:
    """Every layer at every step (the fallback): the model's forward, logits only from the first answer position."""

    def __init__(self, model, reason: str) -> None:
        self.model = model
        self.reason = reason
        self.keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefix_seconds = 0.0

    def describe(self) -> str:
        return f"full forward ({self.reason})"

    def prepare(self, examples, pad_id: int, device) -> None:
        pass

    def losses(self, batch: dict[str, torch.Tensor], indices: list[int]) -> torch.Tensor:
        labels = batch["labels"]
        width = labels.shape[1]
        answer_cols = (labels[:, 1:] != -100).any(0).nonzero().flatten()
        first = int(answer_cols.min()) if answer_cols.numel() else 0
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.keep:
            logits = self.model(**kwargs, logits_to_keep=width - first).logits[:, :-1].float()
        else:
            logits = self.model(**kwargs).logits[:, first:-1].float()
        labels = labels[:, first + 1 :]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return ce.sum(1) / (labels != -100).sum(1).clamp_min(1)


class PrefixForward:
    """Layers [0, L) once per example (kept across epochs), layers [L, n) + norm + lm_head at every step."""

    def __init__(self, model, lowest: int) -> None:
        self.model = model
        self.lowest = lowest
        self.decoder = model.model
        self.hidden: dict[tuple, torch.Tensor] = {}  # example tokens -> hidden states entering layer L, [len, H]
        self.prefix_seconds = 0.0
        self._versions: Optional[int] = None

    def describe(self) -> str:
        n = len(self.decoder.layers)
        if self.lowest == 0:
            return "whole decoder per step (layer 0 or the embeddings train), logits at answer positions only"
        return f"frozen-prefix cache: layers [0, {self.lowest}) once per example, [{self.lowest}, {n}) per step"

    def _frozen_version(self) -> int:
        """Changes whenever a tensor below layer L is written (in-place writes bump a tensor's version counter)."""
        params = list(self.decoder.embed_tokens.parameters()) + [p for layer in self.decoder.layers[: self.lowest] for p in layer.parameters()]
        return sum(p._version for p in params) + sum(id(p) for p in params)

    def prepare(self, examples, pad_id: int, device) -> None:
        """Hidden states entering layer L for every example not cached yet (all of them after a frozen layer changed)."""
        import time

        started = time.perf_counter()
        version = self._frozen_version()
        if version != self._versions:
            self.hidden.clear()
            self._versions = version
        if self.lowest == 0:  # nothing is frozen below the first layer: every step runs the whole decoder
            return
        todo = list(dict.fromkeys(key for key in (tuple(e.prompt_ids) + tuple(e.answer_ids) for e in examples) if key not in self.hidden))
        if not todo:
            return
        with torch.no_grad():
            for bucket in length_buckets([len(k) for k in todo], max_rows=64):
                keys = [todo[i] for i in bucket]
                batch = pad_batch([(list(k), []) for k in keys], pad_id)
                hidden = self._prefix(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                for r, k in enumerate(keys):
                    self.hidden[k] = hidden[r, : len(k)].clone()
        self.prefix_seconds += time.perf_counter() - started

    def _prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.lowest >= len(self.decoder.layers):
            return self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # post-norm

        def capture(module, args, kwargs):
            raise _Captured(args[0] if args else kwargs["hidden_states"])

        handle = self.decoder.layers[self.lowest].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Captured as done:
            return done.hidden
        finally:
            handle.remove()
        raise RuntimeError("layer L never ran")  # pragma: no cover

    def losses(self, batch: dict[str, torch.Tensor], indices: list[int]) -> torch.Tensor:
        mask = batch["attention_mask"]
        if self.lowest == 0:
            out = self.decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
            return answer_losses(self.model.lm_head, out, batch["labels"])
        keys = batch["keys"]
        width = batch["labels"].shape[1]
        first = self.hidden[keys[0]]
        hidden = first.new_zeros((len(keys), width, first.shape[-1]))
        for r, k in enumerate(keys):
            hidden[r, : len(k)] = self.hidden[k]
        if self.lowest >= len(self.decoder.layers):
            out = hidden
        else:
            layers = self.decoder.layers
            self.decoder.layers = torch.nn.ModuleList(list(layers)[self.lowest :])
            try:
                out = self.decoder(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
            finally:
                self.decoder.layers = layers
        return answer_losses(self.model.lm_head, out, batch["labels"])


def training_forward(model, trainable: Sequence[str]):
    """The fastest exact forward for this model and trainable set (see the module doc)."""
    reason = split_reason(model)
    if reason is not None:
        return FullForward(model, reason)
    return PrefixForward(model, lowest_trainable_layer(trainable, len(model.model.layers)))
