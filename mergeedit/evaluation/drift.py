"""General-ability drift of an edited model against its reference (the unedited model), on generic text.

Edits should change a few facts and nothing else; these two numbers say how much else moved:

- perplexity drift: ``ppl(post) / ppl(ref) - 1`` in percent, on a generic text set. Perplexity is
  ``exp(sum NLL / tokens)`` over every token of every text after its first (the text is tokenized whole with the
  tokenizer's usual special tokens, so a BOS, where the tokenizer adds one, predicts the first word).
- next-token KL: mean over the generic prompts of ``KL(ref || post)`` (nats) of the next-token distribution after
  the prompt (the logits at the prompt's last token), so 0 means the edited model predicts the same distribution.

The reference side (`drift_reference`) is computed once on the unedited model and kept (the pipeline caches it in a
stage), so the edited model is scored without loading the reference again. Batches are sorted by length and padded
like the edit metrics (editing.tokens.pad_sequences: attention mask and explicit position ids), so padding does not change a number.

The shipped text set, data/drift/generic.jsonl, holds 40 generic prompts and SmolLM2-135M-Instruct's own greedy
continuations of them (see data/drift/README.md); any JSONL of ``{"prompt", "text"}`` lines can replace it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..core.errors import MergeEditError
from ..core.text_files import read_jsonl_lines, read_text_file
from ..editing.tokens import pad_token_id
from .metrics import batched_logits

__all__ = [
    "DEFAULT_DRIFT_TEXTS",
    "DriftTexts",
    "DriftReference",
    "load_drift_texts",
    "perplexity",
    "next_token_logprobs",
    "kl_divergence",
    "drift_reference",
    "drift_scores",
    "save_reference",
    "load_reference",
]

DEFAULT_DRIFT_TEXTS = Path(__file__).resolve().parents[2] / "data" / "drift" / "generic.jsonl"


@dataclass(frozen=True)
class DriftTexts:
    """Prompts (for next-token KL) and full texts (for perplexity); the shipped set pairs each prompt with its text."""

    prompts: list[str]
    texts: list[str]
    source: str = ""


def load_drift_texts(path: Optional[Path | str] = None) -> DriftTexts:
    """Read a JSONL of ``{"prompt": ..., "text": ...}`` lines (either key may be missing on a line)."""
    path = Path(path) if path is not None else DEFAULT_DRIFT_TEXTS
    if not path.exists():
        raise MergeEditError(f"drift text set {path} not found; pass a JSONL of {{'prompt', 'text'}} lines (--drift-texts / eval.drift_texts)")
    prompts, texts = [], []
    for n, row in read_jsonl_lines(path, read_text_file(path, "drift text set")):
        if not isinstance(row, dict) or not ({"prompt", "text"} & set(row)):
            raise MergeEditError(f"{path}:{n}: a line needs a 'prompt' or a 'text' key")
        if row.get("prompt"):
            prompts.append(str(row["prompt"]))
        if row.get("text"):
            texts.append(str(row["text"]))
    if not prompts or not texts:
        raise MergeEditError(f"{path}: drift needs at least one 'prompt' and one 'text'; found {len(prompts)} and {len(texts)}")
    return DriftTexts(prompts, texts, str(path))


# ----------------------------------------------------------------------------------------------------------------
# Batched forward passes over token id lists


def _log_probs(logits, r: int, positions: slice):
    """float32 log-softmax of row `r` at `positions` only: a whole batch's log-probs ([rows, width, vocab], a GB at
    batch 32 with a 49k vocabulary) were a second copy of the logits and set the evaluation's peak memory."""
    import torch

    return torch.log_softmax(logits[r, positions].float(), dim=-1)


def _encode(tokenizer, texts: Sequence[str], min_tokens: int, what: str) -> list[list[int]]:
    out = []
    for t in texts:
        ids = list(tokenizer(t)["input_ids"])
        if len(ids) < min_tokens:
            raise MergeEditError(f"drift {what} {t[:40]!r} gives {len(ids)} token(s); it needs at least {min_tokens}")
        out.append(ids)
    return out


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16, padding_side: str = "right") -> dict:
    """``{"ppl", "nll", "tokens"}``: exp of the mean NLL (nats) over every predicted token of every text."""
    import torch

    seqs = _encode(tokenizer, texts, 2, "text")
    total, count = 0.0, 0
    for batch, logits, offsets in batched_logits(model, seqs, pad_token_id(tokenizer, model), batch_size, padding_side):
        for r, i in enumerate(batch):
            seq, off = seqs[i], offsets[r]
            nxt = torch.tensor(seq[1:], device=logits.device)
            rows = _log_probs(logits, r, slice(off, off + len(seq) - 1))
            total -= float(rows.gather(-1, nxt[:, None]).double().sum())
            count += len(seq) - 1
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


def next_token_logprobs(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 16, padding_side: str = "right"):
    """float32 tensor [prompts, vocab] (on the CPU): log-softmax of the logits at each prompt's last token."""
    import torch

    seqs = _encode(tokenizer, prompts, 1, "prompt")
    out: list = [None] * len(seqs)
    for batch, logits, offsets in batched_logits(model, seqs, pad_token_id(tokenizer, model), batch_size, padding_side):
        for r, i in enumerate(batch):
            last = offsets[r] + len(seqs[i]) - 1
            out[i] = _log_probs(logits, r, slice(last, last + 1))[0].cpu()
    return torch.stack(out)


def kl_divergence(ref_logprobs, post_logprobs):
    """Per row, ``KL(ref || post) = sum_v p_ref(v) (log p_ref(v) - log p_post(v))`` in nats (float64)."""
    import torch

    if ref_logprobs.shape != post_logprobs.shape:
        raise MergeEditError(
            f"drift: reference next-token distributions have shape {tuple(ref_logprobs.shape)}, the edited model's "
            f"{tuple(post_logprobs.shape)}; both models must share the tokenizer and the prompt set"
        )
    ref, post = ref_logprobs.double(), post_logprobs.double()
    p = ref.exp()
    terms = torch.where(p > 0, p * (ref - post), torch.zeros_like(p))
    return terms.sum(-1)


@dataclass
class DriftReference:
    """What the unedited model gives on the drift set: its perplexity and next-token log-probs."""

    ppl: dict
    logprobs: object  # torch.Tensor [prompts, vocab]
    source: str = ""


def drift_reference(model, tokenizer, drift_texts: DriftTexts, *, batch_size: int = 16) -> DriftReference:
    return DriftReference(
        perplexity(model, tokenizer, drift_texts.texts, batch_size=batch_size),
        next_token_logprobs(model, tokenizer, drift_texts.prompts, batch_size=batch_size),
        drift_texts.source,
    )


def drift_scores(model, tokenizer, drift_texts: DriftTexts, reference: DriftReference, *, batch_size: int = 16) -> dict:
    """``{"ppl", "ppl_ref", "ppl_drift_pct", "kl", "kl_max", "texts", "prompts", "tokens", "source"}`` of the edited model."""
    post = perplexity(model, tokenizer, drift_texts.texts, batch_size=batch_size)
    kl = kl_divergence(reference.logprobs, next_token_logprobs(model, tokenizer, drift_texts.prompts, batch_size=batch_size))
    return {
        "ppl": post["ppl"],
        "ppl_ref": reference.ppl["ppl"],
        "ppl_drift_pct": 100.0 * (post["ppl"] / reference.ppl["ppl"] - 1.0),
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "texts": len(drift_texts.texts),
        "prompts": len(drift_texts.prompts),
        "tokens": post["tokens"],
        "source": drift_texts.source,
    }


def save_reference(reference: DriftReference, folder: Path) -> None:
    """Cache a reference in a stage folder: log-probs as safetensors, perplexity as JSON."""
    from safetensors.torch import save_file

    save_file({"logprobs": reference.logprobs.contiguous()}, Path(folder) / "drift_reference.safetensors")
    (Path(folder) / "drift_reference.json").write_text(json.dumps({"ppl": reference.ppl, "source": reference.source}, indent=2))


def load_reference(folder: Path) -> DriftReference:
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / "drift_reference.json").read_text())
    return DriftReference(meta["ppl"], load_file(Path(folder) / "drift_reference.safetensors")["logprobs"], meta.get("source", ""))
