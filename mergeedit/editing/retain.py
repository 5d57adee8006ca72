"""Retain regularisation: a ``weight * KL(base || current)`` term on unrelated text, mixed into a training step.

Editing should change a few facts and nothing else. This term keeps the edited model's next-token distributions on a
set of generic texts (the *retain set*) close to the unedited model's:

    loss_retain(step) = weight * mean over the predicted positions p of the mini-batch of KL(base_p || current_p)

The base side is computed once, from the unedited model, before training starts (`RetainKL.build`); each training
step then calls ``retain(model, step)`` and adds the returned differentiable scalar to its own loss. The mini-batches
are fixed at build time (texts sorted by token length, then cut into groups of ``batch_size``) and step ``s`` uses
group ``s % len(retain)``, so a run is reproducible and every text is visited once per ``len(retain)`` steps.

Memory is bounded by keeping only the base's top-k next tokens at each position (``top_k``, default 64) plus the
probability mass of everything else ("the rest" bucket). The KL is then the exact KL between the two distributions
coarsened to those k + 1 outcomes:

    KL_k = sum_{v in top-k} p_b(v) (log p_b(v) - log p_c(v)) + r_b (log r_b - log r_c),   r = 1 - sum_{top-k} p

which is 0 when the model equals the base, never exceeds the full KL (the coarsening can only lose information) and
has the same minimum. ``top_k=None`` keeps the full distribution (exact KL; [positions, vocab] float32 in memory,
refused above ``max_reference_bytes``). Measured on SmolLM2-135M-Instruct and the shipped set (benchmarks/retain_kl.py,
results-retain-kl.json; 210 texts cut at 64 tokens = 10,990 positions): the full distributions would take 2.0 GiB,
top-64 takes 8 MiB and leaves 9.6% of the base mass in the rest bucket; after 11 AdamW edit steps the top-16 / 64 /
256 KL is 0.70 / 0.84 / 0.92 of the full KL. top-64 is the default: memory stays small for sets 100x larger, and the
step cost does not depend on k (the current model's full log-softmax is computed either way).

The retain set must not be the set the drift metric is scored on (mergeedit.evaluation.drift, data/drift/): training
on the evaluation texts would make the drift figure meaningless. `load_retain_texts` refuses a file that shares a
prompt or a text with the drift set (by default the shipped data/drift/generic.jsonl; the caller passes the run's own
drift file when it uses another one).

For the term to be exactly 0 before the first optimizer step, the base must be computed with the model in the same
precision (and on the same device) as the training forward passes; under bf16 autocast, build it under the same
autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..core.errors import MergeEditError
from ..core.text_files import read_jsonl_lines, read_text_file
from .compute import attention_kernel
from .prompts import chat_pair, has_chat_template, raw_pair_eos
from .tokens import model_inputs, pad_sequences

__all__ = [
    "DEFAULT_RETAIN_SET",
    "RETAIN_PROSE",
    "RETAIN_ANSWERS",
    "RETAIN_QUESTIONS",
    "RETAIN_CHAT_QUESTIONS",
    "DRIFT_EVAL_TEXTS",
    "RetainTexts",
    "RetainKL",
    "retain_batches",
    "retain_token_ids",
    "retain_pad_id",
    "load_retain_texts",
    "check_disjoint",
    "coarsened_kl",
]

_DATA = Path(__file__).resolve().parents[2] / "data"
# Generic prose: the reference model's own continuations of generic prompts (data/retain/make_retain.py).
RETAIN_PROSE = _DATA / "retain" / "retain.jsonl"
# Questions followed by a short named-entity answer written out (data/retain/make_answers.py): the KL then holds the
# positions inside names, where ZsRE locality is lost. With the prose, the default set (benchmarks/README.md: at 100
# edits it raised locality from 0.757 to 0.825 and cut drift, the other columns no worse).
RETAIN_ANSWERS = _DATA / "retain" / "answers.jsonl"
# Short questions followed by the unedited model's own answer (data/retain/make_questions.py): question-shaped text
# for the KL to hold, as the locality probes are; `rsft.retain.path: [retain.jsonl, questions.jsonl]` uses both.
RETAIN_QUESTIONS = _DATA / "retain" / "questions.jsonl"
# The same questions and answers as {"question", "answer"} lines, read in the chat form the edits are trained in
# (data/retain/make_chat_questions.py): the KL and the null space then hold the model's chat answers to unrelated
# questions, which the evaluation's loc_chat scores (benchmarks/README.md: at 100 edits loc_chat 0.44 -> 0.66, the
# raw-text locality unchanged, Rel and Gen 0.01-0.02 lower).
RETAIN_CHAT_QUESTIONS = _DATA / "retain" / "chat_questions.jsonl"
DEFAULT_RETAIN_SET = (RETAIN_PROSE, RETAIN_ANSWERS, RETAIN_CHAT_QUESTIONS)
# The shipped drift-evaluation set (mergeedit.evaluation.drift.DEFAULT_DRIFT_TEXTS; editing may not import evaluation).
DRIFT_EVAL_TEXTS = _DATA / "drift" / "generic.jsonl"


@dataclass(frozen=True)
class RetainTexts:
    """Generic texts to keep unchanged; ``prompts`` are kept only to check the set against the drift set. ``chat``
    holds (question, answer) pairs read in the chat form the edits are trained in (`retain_token_ids`)."""

    prompts: list[str]
    texts: list[str]
    source: str = ""
    chat: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts) + len(self.chat)

    def plain(self) -> list[str]:
        """Every item as plain text (a chat pair as ``question + " " + answer``): what the drift check compares."""
        return self.texts + [f"{q} {a}" for q, a in self.chat]


_LINE_FORMS = '{"prompt": ..., "text": ...} (plain text) or {"question": ..., "answer": ...} (read in the chat form)'


def _read_pairs(path: Path, what: str) -> RetainTexts:
    prompts, texts, chat = [], [], []
    for n, row in read_jsonl_lines(path, read_text_file(path, what)):
        if isinstance(row, dict) and row.get("question") and row.get("answer"):
            chat.append((str(row["question"]), str(row["answer"])))
            prompts.append(str(row["question"]))
            continue
        if not isinstance(row, dict) or not row.get("text"):
            raise MergeEditError(f"{path}:{n}: a {what} line needs a non-empty 'text' key (and optionally 'prompt'), or 'question' and 'answer': {_LINE_FORMS}")
        texts.append(str(row["text"]))
        if row.get("prompt"):
            prompts.append(str(row["prompt"]))
    if not texts and not chat:
        raise MergeEditError(f"{path}: the {what} holds no line; write one JSON object per line: {_LINE_FORMS}")
    return RetainTexts(prompts, texts, str(path), chat)


def check_disjoint(retain: RetainTexts, evaluation: RetainTexts) -> None:
    """Raise a one-line MergeEditError when the retain set shares a prompt or a text with the evaluation set."""
    for kind, ours, theirs in (("prompt", retain.prompts, evaluation.prompts), ("text", retain.plain(), evaluation.plain())):
        shared = [x for x in dict.fromkeys(ours) if x in set(theirs)]
        if shared:
            raise MergeEditError(
                f"{retain.source or 'retain set'}: shares {len(shared)} {kind}(s) with the drift evaluation set {evaluation.source} "
                f"(first: {shared[0][:60]!r}); training on the evaluation texts makes the drift figure meaningless: "
                f"use another retain file (the shipped ones are {', '.join(str(p.relative_to(_DATA.parent)) for p in DEFAULT_RETAIN_SET)})"
            )


def load_retain_texts(
    path: Optional[Union[Path, str, Sequence[Union[Path, str]]]] = None, *, drift_texts: Sequence[Union[Path, str]] = (DRIFT_EVAL_TEXTS,)
) -> RetainTexts:
    """Read a retain JSONL of ``{"prompt", "text"}`` lines, or several (a list of paths: their texts in the order
    given). Default: the shipped prose, named-entity answers and chat questions together (DEFAULT_RETAIN_SET).

    Every file in ``drift_texts`` (default: the shipped drift set; pass the run's drift file too when it uses its own)
    is read and must share no prompt and no text with the retain set. A missing drift file is skipped: there is
    nothing to collide with.
    """
    paths = list(DEFAULT_RETAIN_SET) if path is None else [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    if not paths:
        raise MergeEditError("retain set: the list of retain files is empty; name at least one JSONL file")
    parts = []
    for one in paths:
        retain = _read_pairs(one, "retain set")
        for other in drift_texts:
            other = Path(other)
            if other.is_file():
                if other.resolve() == one.resolve():
                    raise MergeEditError(f"{one}: is the drift evaluation set; training on the evaluation texts makes the drift figure meaningless: use another retain file")
                check_disjoint(retain, _read_pairs(other, "drift set"))
        parts.append(retain)
    if len(parts) == 1:
        return parts[0]
    return RetainTexts([p for r in parts for p in r.prompts], [t for r in parts for t in r.texts], " + ".join(r.source for r in parts), [c for r in parts for c in r.chat])


def coarsened_kl(base_idx: torch.Tensor, base_logp: torch.Tensor, base_rest: torch.Tensor, current_logp: torch.Tensor) -> torch.Tensor:
    """Per position, KL(base || current) over the base's top-k tokens plus one bucket for the rest (nats).

    base_idx [n, k] (token ids), base_logp [n, k] (their base log-probs), base_rest [n] (log of the base's remaining
    mass, -inf when none), current_logp [n, vocab] (the current model's log-softmax). Differentiable in current_logp.
    """
    cur_top = current_logp.gather(-1, base_idx)
    rest_mask = torch.ones_like(current_logp, dtype=torch.bool).scatter_(-1, base_idx, False)
    cur_rest = torch.logsumexp(current_logp.masked_fill(~rest_mask, float("-inf")), dim=-1)
    p_top = base_logp.exp()
    terms = torch.where(p_top > 0, p_top * (base_logp - cur_top), torch.zeros_like(p_top)).sum(-1)
    p_rest = base_rest.exp()
    rest = torch.where(p_rest > 0, p_rest * (base_rest - cur_rest), torch.zeros_like(p_rest))
    return terms + rest


def _full_kl(base_logp: torch.Tensor, current_logp: torch.Tensor) -> torch.Tensor:
    p = base_logp.exp()
    return torch.where(p > 0, p * (base_logp - current_logp), torch.zeros_like(p)).sum(-1)


def retain_token_ids(tokenizer, retain: Union[RetainTexts, Sequence[str]], max_tokens: int, system_prompt: Optional[str] = None) -> list[list[int]]:
    """Each retain text tokenized whole (the tokenizer's usual special tokens), then each chat pair as R-SFT trains an
    edit (editing.prompts.chat_pair: the question as a user turn with the assistant header, the run's `system_prompt`
    or else no template default one, the answer, end of turn; plain ``question + " " + answer`` + EOS for a tokenizer
    without a chat template); every sequence cut to its first ``max_tokens``."""
    texts, chat = (retain.texts, retain.chat) if isinstance(retain, RetainTexts) else (list(retain), [])
    seqs = []
    for t in texts:
        seqs.append(_at_least_two(list(tokenizer(t)["input_ids"])[:max_tokens], t))
    for q, a in chat:
        prompt, answer = chat_pair(tokenizer, q, a, system_prompt) if has_chat_template(tokenizer) else raw_pair_eos(tokenizer, q, a)
        seqs.append(_at_least_two((list(prompt) + list(answer))[:max_tokens], f"{q} {a}"))
    return seqs


def _at_least_two(ids: list[int], text: str) -> list[int]:
    if len(ids) < 2:
        raise MergeEditError(f"retain text {text[:40]!r} gives {len(ids)} token(s); it needs at least 2 (one to read, one to predict)")
    return ids


def retain_pad_id(tokenizer) -> int:
    """The pad id of the retain batches: the tokenizer's pad token, else its EOS, else 0 (padding is masked out)."""
    return next((c for c in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)) if isinstance(c, int)), 0)


def retain_groups(
    tokenizer, retain: Union[RetainTexts, Sequence[str]], *, batch_size: int = 8, max_tokens: int = 64, device: Optional[torch.device] = None,
    system_prompt: Optional[str] = None,
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """The retain set tokenized once (`retain_token_ids`) and cut into padded mini-batches with no forward pass:
    (batch, rows, cols) per mini-batch, in step order, as `RetainKL.from_groups` reads them."""
    seqs = retain_token_ids(tokenizer, retain, max_tokens, system_prompt)
    _check_sequences(seqs, batch_size)
    return list(_padded(seqs, batch_size, retain_pad_id(tokenizer), device or torch.device("cpu")))


def retain_batches(
    tokenizer, retain: Union[RetainTexts, Sequence[str]], *, batch_size: int = 8, max_tokens: int = 64, device: Optional[torch.device] = None
) -> list[dict[str, torch.Tensor]]:
    """The retain set's padded mini-batches with no forward pass: the same batches, in the same order, as
    ``RetainKL.build(...).batches()`` with these settings. For a reader of the inputs alone (the null-space projection)
    when no KL term and no locality probe needs the base's distributions."""
    return [batch for batch, _, _ in retain_groups(tokenizer, retain, batch_size=batch_size, max_tokens=max_tokens, device=device)]


def _check_sequences(seqs: Sequence[Sequence[int]], batch_size: int) -> None:
    if batch_size < 1:
        raise MergeEditError(f"retain batch_size must be >= 1, got {batch_size}")
    if not seqs or any(len(s) < 2 for s in seqs):
        raise MergeEditError("retain set: every sequence needs at least 2 tokens, and there must be at least one")


def _padded(seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: torch.device):
    """The sequences sorted by length (ties by position), cut into groups of ``batch_size``, each right-padded:
    yields (batch, rows, cols), where (rows[i], cols[i]) is the position whose logits predict the next token."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    for start in range(0, len(order), batch_size):
        chosen = [list(seqs[i]) for i in order[start : start + batch_size]]
        ids, mask, pos, _ = pad_sequences(chosen, pad_id, "right")
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}
        rows = torch.cat([torch.full((len(s) - 1,), r, dtype=torch.long) for r, s in enumerate(chosen)]).to(device)
        cols = torch.cat([torch.arange(len(s) - 1, dtype=torch.long) for s in chosen]).to(device)
        yield batch, rows, cols


def _forward_logp(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-softmax at every position of a padded batch ([rows, width, vocab]): float32, or float64 for a float64 model.
    The batch's width picks the attention kernel as for a training forward (editing.compute), with or without
    gradients: the base side, the steps and the agreement probe all run the same one."""
    ids = batch["input_ids"]
    with attention_kernel(model, ids.shape[1], ids.device, training=True):
        logits = model(**model_inputs(model, batch)).logits
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


@dataclass
class _Group:
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids (right-padded)
    rows: torch.Tensor  # [n] row of each predicted position
    cols: torch.Tensor  # [n] column (position) whose logits predict the next token
    idx: Optional[torch.Tensor]  # [n, k] base top-k token ids (None: full distribution)
    logp: torch.Tensor  # [n, k] or [n, vocab] base log-probs
    rest: Optional[torch.Tensor]  # [n] log of the base mass outside the top-k
    total: int  # predicted positions of the whole mini-batch this group is (or is a process's part of)


def _part(batch: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor, rank: int, size: int):
    """Process ``rank`` of ``size``'s share of a right-padded mini-batch: its rows rank, rank + size, ..., trimmed to the
    longest of them, as (batch, rows, cols) with the positions renumbered into it (row r + j size of the mini-batch
    is row j of the part); None when the mini-batch has no row for it."""
    mask = batch["attention_mask"]
    kept = torch.arange(rank, mask.shape[0], size, device=mask.device)
    if kept.numel() == 0:
        return None
    width = int(mask[kept].sum(dim=1).max())  # right-padded: the part's own longest row
    chosen = (rows % size) == rank
    return {k: v[kept, :width] for k, v in batch.items()}, torch.div(rows[chosen], size, rounding_mode="floor"), cols[chosen]


def _base_side(model, batch: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor, top_k: Optional[int], total: int) -> _Group:
    """The base model's distributions at a (part of a) mini-batch's predicted positions: whole, or its top-k and the
    log of the mass outside them."""
    logp = _forward_logp(model, batch)[rows, cols]
    if top_k is None or top_k >= logp.shape[-1]:
        return _Group(batch, rows, cols, None, logp, None, total)
    top, idx = logp.topk(top_k, dim=-1)
    rest = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)
    return _Group(batch, rows, cols, idx, top.contiguous(), rest, total)


def _group_kl(g: _Group, current: torch.Tensor) -> torch.Tensor:
    """KL(base || current) at each of the group's positions."""
    return _full_kl(g.logp, current) if g.idx is None else coarsened_kl(g.idx, g.logp, g.rest, current)


class RetainKL:
    """``retain(model, step)`` -> ``weight * mean KL(base || current)`` over one mini-batch of retain texts.

    Build it once from the unedited model (`build` for texts, `from_token_ids` for token id lists); then, in any
    training step, ``loss = edit_loss + retain(model, step)``. ``len(retain)`` is the number of mini-batches;
    ``retain.kl(model, step)`` is the unweighted KL (a tensor), ``retain.reference_bytes`` what the base side holds.

    Built for ``parts`` processes (editing.collective), the base side of each mini-batch is computed on each process's
    share of it, in the shape that process's steps read (`_part`), so the KL before the first step is exactly 0
    whatever the process count (a reduced-precision forward rounds a row differently in a batch of another shape).
    ``groups`` then holds ``parts`` entries per mini-batch, mini-batch by mini-batch (None: a share with no row).
    """

    def __init__(self, groups: list[Optional[_Group]], batches: list[dict[str, torch.Tensor]], weight: float, top_k: Optional[int],
                 source: str = "", parts: int = 1):
        self.groups = groups
        self.parts = parts
        self._batches = batches  # the whole mini-batches, in step order
        self.weight = float(weight)
        self.top_k = top_k
        self.source = source

    # -- building -----------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model,
        tokenizer,
        retain: Union[RetainTexts, Sequence[str]],
        *,
        weight: float = 1.0,
        top_k: Optional[int] = 64,
        batch_size: int = 8,
        max_tokens: int = 64,
        pad_id: Optional[int] = None,
        device: Optional[torch.device] = None,
        max_reference_bytes: int = 2 << 30,
        max_groups: Optional[int] = None,
        parts: int = 1,
    ) -> "RetainKL":
        """Tokenize each text whole (the tokenizer's usual special tokens), keep its first ``max_tokens`` tokens."""
        seqs = retain_token_ids(tokenizer, retain, max_tokens)
        source = retain.source if isinstance(retain, RetainTexts) else ""
        return cls.from_token_ids(model, seqs, weight=weight, top_k=top_k, batch_size=batch_size, pad_id=retain_pad_id(tokenizer) if pad_id is None else pad_id,
                                  device=device, max_reference_bytes=max_reference_bytes, source=source, max_groups=max_groups, parts=parts)

    @classmethod
    def from_token_ids(
        cls,
        model,
        seqs: Sequence[Sequence[int]],
        *,
        weight: float = 1.0,
        top_k: Optional[int] = 64,
        batch_size: int = 8,
        pad_id: int = 0,
        device: Optional[torch.device] = None,
        max_reference_bytes: int = 2 << 30,
        source: str = "",
        max_groups: Optional[int] = None,
        parts: int = 1,
    ) -> "RetainKL":
        """The base side of token id lists, each sorted into right-padded mini-batches of ``batch_size``."""
        _check_sequences(seqs, batch_size)
        if device is None:
            device = next(model.parameters()).device
        return cls.from_groups(model, list(_padded(seqs, batch_size, pad_id, device)), weight=weight, top_k=top_k,
                               max_reference_bytes=max_reference_bytes, source=source, max_groups=max_groups, parts=parts)

    @classmethod
    def from_groups(
        cls,
        model,
        groups: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]],
        *,
        weight: float = 1.0,
        top_k: Optional[int] = 64,
        max_reference_bytes: int = 2 << 30,
        source: str = "",
        max_groups: Optional[int] = None,
        parts: int = 1,
    ) -> "RetainKL":
        """The base side from the model as it is now (call it before training), over padded mini-batches
        (`retain_groups`: (batch, rows, cols), (rows[i], cols[i]) the position predicting the next token; every position
        of a sequence but the last, all kept). ``max_groups``: only the first that many mini-batches (a caller that
        takes fewer steps than there are mini-batches reads no other; step s reads s mod count, so the steps it takes
        read the same mini-batches either way). ``parts``: the number of processes whose steps will read it (each
        mini-batch's base side is computed per process share, every share on every process)."""
        if parts < 1:
            raise MergeEditError(f"retain parts must be >= 1 (the processes training together), got {parts}")
        if max_groups is not None and max_groups < 1:
            raise MergeEditError(f"retain max_groups must be >= 1 or None, got {max_groups}")
        if weight < 0 or not math.isfinite(weight):
            raise MergeEditError(f"retain weight must be a finite number >= 0, got {weight}")
        if not groups:
            raise MergeEditError("retain set: every sequence needs at least 2 tokens, and there must be at least one")
        positions = sum(int(rows.numel()) for _, rows, _ in groups)
        vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None else None
        if top_k is not None and top_k < 1:
            raise MergeEditError(f"retain top_k must be >= 1 or null (full distribution), got {top_k}")
        per_pos = (8 * top_k + 4 * top_k + 4) if top_k is not None else 4 * (vocab or 0)
        if positions * per_pos > max_reference_bytes:
            raise MergeEditError(
                f"retain set: the base distributions would take {positions * per_pos / 2**30:.1f} GiB ({positions} positions); "
                f"use a smaller top_k, fewer texts or a shorter max_tokens"
            )
        built: list[Optional[_Group]] = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for whole in groups[:max_groups]:  # None: every group
                total = int(whole[1].numel())
                for share in [whole] if parts == 1 else [_part(*whole, r, parts) for r in range(parts)]:
                    built.append(None if share is None else _base_side(model, *share, top_k, total))
        model.train(was_training)
        return cls(built, [batch for batch, _, _ in groups[:max_groups]], weight, top_k, source, parts)

    # -- using ----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._batches)

    def batches(self) -> list[dict[str, torch.Tensor]]:
        """The padded retain mini-batches (input_ids, attention_mask, position_ids), in step order."""
        return list(self._batches)

    def _built(self) -> list[_Group]:
        return [g for g in self.groups if g is not None]

    @property
    def positions(self) -> int:
        return sum(int(g.rows.numel()) for g in self._built())

    @property
    def reference_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self._built() for t in (g.idx, g.logp, g.rest) if t is not None)

    def kl(self, model, step: int, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Mean KL(base || current) (nats) over the predicted positions of mini-batch ``step % len(self)``.

        ``part=(r, n)``: process r of n (editing.collective; the KL must be built with ``parts=n``) takes the
        mini-batch's rows r, r + n, ... (`_part`) and returns their KL summed and divided by the whole mini-batch's
        positions, so the n parts add up to the mean (and so do their gradients). A part with no row is a zero with no
        graph."""
        rank, size = part
        if size != self.parts or not 0 <= rank < size:
            raise ValueError(f"retain KL built for {self.parts} process(es), read as part {rank} of {size}")
        g = self.groups[(step % len(self)) * size + rank]
        if g is None:
            return torch.zeros((), device=self._batches[0]["input_ids"].device)
        per_pos = _group_kl(g, _forward_logp(model, g.batch)[g.rows, g.cols])
        return per_pos.mean() if size == 1 else per_pos.sum() / g.total

    def agreement(self, model) -> dict:
        """How close ``model`` stays to the base on every retain position (no gradients): ``retain_loc``, the share of
        positions whose most likely next token is still the base's, and ``retain_kl``, the mean KL(base || model).
        The locality probe of `merge: {auto}`: unrelated text, never the evaluation's locality prompts."""
        was_training = model.training
        model.eval()
        same, kl, n = 0, 0.0, 0
        with torch.no_grad():
            for g in self._built():  # every process's share (the same numbers on every process)
                current = _forward_logp(model, g.batch)[g.rows, g.cols]
                base_top = g.logp.argmax(-1) if g.idx is None else g.idx.gather(-1, g.logp.argmax(-1, keepdim=True)).squeeze(-1)
                same += int((current.argmax(-1) == base_top).sum())
                kl += float(_group_kl(g, current).double().sum())
                n += int(g.rows.numel())
        model.train(was_training)
        return {"retain_loc": same / n, "retain_kl": kl / n}

    def __call__(self, model, step: int) -> torch.Tensor:
        """``weight * kl(model, step)``: add it to the step's loss before ``backward()``."""
        if self.weight == 0:
            return torch.zeros((), device=self._batches[0]["input_ids"].device)
        return self.weight * self.kl(model, step)

    loss = __call__

    def describe(self) -> dict:
        """What the run stores about the term."""
        return {
            "weight": self.weight,
            "top_k": self.top_k,
            "batches": len(self),
            "positions": self.positions,
            "reference_bytes": self.reference_bytes,
            "source": self.source,
        }
