"""Token-level helpers shared by training and scoring: where a target's tokens sit after a prompt, and padding.

Written once here so the tokens R-SFT trains on and the tokens the metrics score are cut by the same rule.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.errors import MergeEditError


def encode_prompt_target(tokenizer, prompt: str, target: str) -> tuple[list[int], int, int]:
    """Token ids of ``prompt + " " + target`` and the target token range ``[start, end)`` in them.

    The ids returned stop at ``end`` (trailing special tokens such as an appended EOS are dropped).
    """
    full = prompt + " " + target
    cut = len(prompt)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        special = enc["special_tokens_mask"]
        target_idx = [i for i, ((_, end), sp) in enumerate(zip(enc["offset_mapping"], special)) if not sp and end > cut]
        if not target_idx:
            raise MergeEditError(f"target {target!r} of prompt {prompt!r} has no tokens: an empty answer cannot be scored")
        start, stop = target_idx[0], target_idx[-1] + 1
    else:
        ids = list(tokenizer(full)["input_ids"])
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        start = 0
        while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
            start += 1
        specials = set(getattr(tokenizer, "all_special_ids", []) or [])
        stop = len(ids)
        while stop > start and ids[stop - 1] in specials:
            stop -= 1
        if stop <= start:
            raise MergeEditError(f"target {target!r} of prompt {prompt!r} has no tokens: an empty answer cannot be scored")
    if start == 0:
        raise MergeEditError(f"prompt {prompt!r} gives no token before the target {target!r}: nothing predicts its first token")
    return ids[:stop], start, stop


def pad_token_id(tokenizer, model=None) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS, else the model's generation pad id, else 0."""
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    return 0


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str):
    """(input_ids, attention_mask, position_ids, offsets): offsets[r] is where row r's first real token sits."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for r, s in enumerate(seqs):
        off = width - len(s) if side == "left" else 0
        ids[r, off : off + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, off : off + len(s)] = 1
        offsets.append(off)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, offsets


def pad_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 everywhere but the answer tokens)."""
    ids, mask, _, _ = pad_sequences([list(p) + list(a) for p, a in pairs], pad_id, "right")
    labels = torch.full(ids.shape, -100, dtype=torch.long)
    for row, (p, a) in enumerate(pairs):
        labels[row, len(p) : len(p) + len(a)] = torch.tensor(list(a), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_buckets(lengths: Sequence[int], max_waste: float = 0.15, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped by length so a padded group wastes at most `max_waste` of its cells (or one token per row).

    Sorted by (length, index), so the grouping is deterministic; every index appears in exactly one group. Each row of
    a group is one example: grouping never joins two examples' tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    tokens = 0
    for i in order:
        if groups and (max_rows is None or len(groups[-1]) < max_rows):
            width = lengths[i]  # the longest so far, since the order is ascending
            rows = len(groups[-1]) + 1
            cells = width * rows
            if cells - (tokens + lengths[i]) <= max(max_waste * cells, rows):
                groups[-1].append(i)
                tokens += lengths[i]
                continue
        groups.append([i])
        tokens = lengths[i]
    return groups


def model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of a causal LM's forward for a padded batch: input_ids, attention_mask, and position_ids
    where the model takes them (the batch's own, else counted from the attention mask)."""
    import inspect

    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = batch["position_ids"] if "position_ids" in batch else (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return kwargs
