"""Edit-quality metrics over any Hugging Face causal LM: pure functions, batched and padded (EasyEdit conventions).

Conventions (see also docs/editing-eval.md):

Teacher forcing (`teacher_forced_accuracy`, `teacher_forced_tokens`)
    The model reads ``prompt + " " + target`` (EasyEdit's join: one space, whatever the prompt ends with), tokenized
    ONCE as a whole with the tokenizer's usual special tokens (a BOS where the tokenizer adds one). The target tokens
    are the tokens of that full encoding whose character span reaches past the prompt, i.e. whose offset end is
    greater than ``len(prompt)`` (special tokens excluded). So the target's token boundaries are exactly those of the
    full string: a BPE ``"ĠParis"`` or SentencePiece ``"▁Paris"`` that carries the joining space counts as a target
    token, and a token that straddles the prompt/target border counts as target. Special tokens the tokenizer appends
    after the text (an EOS) are dropped and never fed. Slow (non-Rust) tokenizers have no offsets: there the prompt is
    tokenized alone and the target tokens are the full encoding past the longest common prefix of the two encodings.
    For a target token at position ``t`` the prediction is the argmax of the logits at position ``t - 1``.
    Accuracy is the fraction of target tokens whose prediction equals the token (partial credit).

Padding
    Sequences are sorted by length and cut into batches of ``batch_size`` (results come back in input order). Right
    padding is the default for teacher forcing; left padding is supported too. Either way the batch carries an
    attention mask and explicit position ids (``cumsum(mask) - 1``) whenever the model's ``forward`` takes
    ``position_ids``, so a padded row computes what the unpadded sequence computes. Generation always pads left.

Several processes (`shared`)
    Inside ``with shared(collective):`` the batches are formed exactly as in one process, dealt out whole (largest
    padded size first, each to the least loaded process), and the per-item results gathered, so every process
    returns the list one process computes, number for number: no batch changes its rows or its padding.

Generation (`generate_answers`)
    Greedy decoding (``do_sample=False, num_beams=1``; the model's sampling defaults are overridden) from the question
    alone, optionally wrapped in the tokenizer's chat template as a single user turn with the generation prompt
    (then tokenized with ``add_special_tokens=False``: the template writes its own BOS). The chat form is R-SFT's
    (``editing.prompts.chat_prompt``): a default system prompt the template would inject is left out unless one is
    given, so edits are asked the way they were trained. Batched, left-padded, with the KV cache. A row stops at EOS (the
    tokenizer's and the generation config's), or as soon as its decoded continuation contains a newline or a period,
    or after ``max_new_tokens``. The answer is the continuation decoded with special tokens skipped, cut at the first
    ``"\\n"`` or ``"."`` and stripped of surrounding whitespace (so a continuation that starts with a newline yields
    ``""``: the protocol is strict on purpose).

Exact match: SQuAD's ``normalize_answer`` (lower case, drop ASCII punctuation, drop the articles a/an/the, collapse
whitespace) on both sides, 1.0 if the prediction equals any normalised answer.

Fluency (`ngram_entropy`): EasyEdit's ``n_gram_entropy`` (from ROME): per text, the Shannon entropies (log base 2)
of the bigram and trigram frequency distributions, weighted 2/3 and 4/3, averaged arithmetically
(``(2/3 * H2 + 4/3 * H3) / 2``); then the arithmetic mean over texts. Words come from a regex approximation of
``nltk.word_tokenize`` (words, ``n't`` and ``'s``/``'re``/... split off, every other punctuation character a token),
so nltk is not needed; an n-gram distribution that is empty (a text shorter than n words) has entropy 0 (EasyEdit
would give NaN).
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterable, Iterator, Sequence

from ..core.errors import MergeEditError
from ..editing.collective import Collective, gather_json, positions
from ..editing.prompts import chat_prompt, has_chat_template
from ..editing.tokens import encode_prompt_target, pad_sequences, pad_token_id

__all__ = [
    "teacher_forced_accuracy",
    "teacher_forced_tokens",
    "locality",
    "generate_answers",
    "squad_normalize",
    "exact_match",
    "ngram_entropy",
    "text_ngram_entropy",
]

STOP_CHARS = ("\n", ".")


# ----------------------------------------------------------------------------------------------------------------
# Batched forward passes


@contextmanager
def _inference(model) -> Iterator[None]:
    """Eval mode (dropout off) and no autograd for the duration; every module's training flag is restored after."""
    import torch

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _device(model):
    import torch

    device = getattr(model, "device", None)
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    return device


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding wastes little."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


_SHARED: ContextVar[Collective | None] = ContextVar("mergeedit_evaluation_shared", default=None)


@contextmanager
def shared(collective: Collective | None) -> Iterator[None]:
    """The batched passes in this block (teacher forcing, generation) run each process's share of the batches and
    return every item's result (module docstring: "Several processes"). Every process must make the same calls in
    the block. None or one process: nothing changes."""
    token = _SHARED.set(collective)
    try:
        yield
    finally:
        _SHARED.reset(token)


def _my_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The length batches (`_batches`) this process runs: all of them outside `shared`."""
    batches = _batches(lengths, batch_size)
    padded = [len(b) * max(lengths[i] for i in b) for b in batches]
    return [batches[k] for k in positions(len(batches), _SHARED.get(), padded)]


def _gathered(results: dict[int, Any], count: int) -> list[Any]:
    """The results of all `count` items in input order, from this process's `{index: result}` (JSON values)."""
    parts = gather_json(sorted(results.items()), _SHARED.get())
    merged = {i: value for part in parts for i, value in part}
    return [merged[i] for i in range(count)]


def batched_logits(
    model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int, padding_side: str, read_from: Sequence[int] | None = None,
    batches: Sequence[Sequence[int]] | None = None,
):
    """Yields (batch indices, logits [rows, width, vocab], left-pad offsets) for length-sorted padded batches of `seqs`
    (`batches`, when given: those of them this process runs), in inference mode, with position ids that ignore
    padding when the model takes them.

    read_from: per sequence, the first position whose logits the caller reads. Then (when the model takes
    `logits_to_keep`) the output layer runs only from the batch's earliest such position on, and the offsets come
    back shifted by that position, so `logits[r, offsets[r] + t]` is still position t of row r's sequence."""
    device = _device(model)
    with_positions = _accepts(model, "position_ids")
    no_cache = _accepts(model, "use_cache")
    trim = read_from is not None and _accepts(model, "logits_to_keep")
    with _inference(model):
        for batch in _batches([len(s) for s in seqs], batch_size) if batches is None else batches:
            ids, mask, position_ids, offsets = pad_sequences([seqs[i] for i in batch], pad_id, padding_side)
            kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if with_positions:
                kwargs["position_ids"] = position_ids.to(device)
            if no_cache:
                kwargs["use_cache"] = False
            first = min(offsets[r] + read_from[i] for r, i in enumerate(batch)) if trim else 0  # type: ignore[index]
            if trim:
                kwargs["logits_to_keep"] = ids.shape[1] - first
            logits = model(**kwargs).logits
            yield batch, logits, [off - first for off in offsets]
            del logits


def teacher_forced_predictions(model, tokenizer, prompts, targets, batch_size: int, padding_side: str):
    """Per pair: (predicted ids, target ids) over the target positions of ``prompt + " " + target``."""
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    return _predictions(model, tokenizer, [encode_prompt_target(tokenizer, p, t) for p, t in zip(prompts, targets)], batch_size, padding_side)


def chat_teacher_forced_tokens(
    model, tokenizer, questions: Sequence[str], answers: Sequence[str], *, batch_size: int = 16, padding_side: str = "right", system_prompt: str | None = None
) -> list[list[int]]:
    """Argmax token id at each answer position of the chat form: the question as one user turn with the assistant
    header (``editing.prompts.chat_prompt``, R-SFT's form: no template default system prompt unless given), then the
    answer's tokens (no end of turn). What a chat user's unrelated question would read (pre-vs-post ``loc_chat``)."""
    questions, answers = list(questions), list(answers)
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    encoded = []
    for q, a in zip(questions, answers):
        prompt = tokenizer(chat_prompt(tokenizer, q, system_prompt), add_special_tokens=False)["input_ids"]
        answer = tokenizer(a, add_special_tokens=False)["input_ids"]
        if not answer:
            raise MergeEditError(f"answer {a!r} of question {q!r} has no tokens: an empty answer cannot be scored")
        encoded.append((list(prompt) + list(answer), len(prompt), len(prompt) + len(answer)))
    return [pred for pred, _ in _predictions(model, tokenizer, encoded, batch_size, padding_side)]


def _predictions(model, tokenizer, encoded: list[tuple[list[int], int, int]], batch_size: int, padding_side: str):
    """Per (ids, start, stop): (argmax ids predicting positions start..stop-1, ids[start:stop])."""
    if not encoded:
        return []
    pad_id = pad_token_id(tokenizer, model)
    seqs, starts = [e[0] for e in encoded], [e[1] - 1 for e in encoded]  # only the positions that predict a target token
    mine = _my_batches([len(x) for x in seqs], batch_size)
    predicted: dict[int, list[int]] = {}
    for batch, logits, offsets in batched_logits(model, seqs, pad_id, batch_size, padding_side, read_from=starts, batches=mine):
        for r, i in enumerate(batch):
            _, start, stop = encoded[i]
            off = offsets[r]
            predicted[i] = logits[r, off + start - 1 : off + stop - 1].argmax(-1).tolist()
    return [(pred, encoded[i][0][encoded[i][1] : encoded[i][2]]) for i, pred in enumerate(_gathered(predicted, len(encoded)))]


def teacher_forced_tokens(
    model, tokenizer, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16, padding_side: str = "right"
) -> list[list[int]]:
    """Argmax token id at each target position of ``prompt + " " + target`` (used for pre-vs-post locality)."""
    return [pred for pred, _ in teacher_forced_predictions(model, tokenizer, prompts, targets, batch_size, padding_side)]


def teacher_forced_accuracy(
    model, tokenizer, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16, padding_side: str = "right"
) -> list[float]:
    """Fraction of target tokens the model predicts (argmax) when fed ``prompt + " " + target``; one per pair."""
    out = []
    for pred, gold in teacher_forced_predictions(model, tokenizer, prompts, targets, batch_size, padding_side):
        out.append(sum(int(p == g) for p, g in zip(pred, gold)) / len(gold))
    return out


def locality(pre_tokens: Sequence[Sequence[int]], post_tokens: Sequence[Sequence[int]]) -> list[float]:
    """mean(pre == post) per probe: the share of target positions whose argmax the edit left unchanged."""
    if len(pre_tokens) != len(post_tokens):
        raise ValueError(f"{len(pre_tokens)} pre-edit probes but {len(post_tokens)} post-edit probes")
    out = []
    for k, (pre, post) in enumerate(zip(pre_tokens, post_tokens)):
        if len(pre) != len(post) or not pre:
            raise ValueError(
                f"probe {k}: {len(pre)} pre-edit tokens vs {len(post)} post-edit tokens "
                "(were they computed with another tokenizer or other probes?)"
            )
        out.append(sum(int(a == b) for a, b in zip(pre, post)) / len(pre))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Generation


def _generation_inputs(tokenizer, prompts: Sequence[str], chat_template: bool | None, system_prompt: str | None = None) -> list[list[int]]:
    """Prompt ids: the raw question, or the chat form R-SFT trains on (`editing.prompts.chat_prompt`: no template
    default system prompt unless `system_prompt` is given)."""
    has_template = has_chat_template(tokenizer)
    use = has_template if chat_template is None else bool(chat_template)
    if use and not has_template:
        raise MergeEditError("chat_template=True but the tokenizer has no chat template; pass chat_template=False")
    if not use:
        return [list(tokenizer(p)["input_ids"]) for p in prompts]
    return [list(tokenizer(chat_prompt(tokenizer, p, system_prompt), add_special_tokens=False)["input_ids"]) for p in prompts]


def _eos_ids(tokenizer, model) -> list[int]:
    ids: list[int] = []
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def generate_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    chat_template: bool | None,
    batch_size: int,
    stop_chars: Sequence[str],
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy continuations (decoded, special tokens skipped), cut at the first of `stop_chars` (not stripped).

    Batches of `batch_size` prompts of similar length, left-padded, decoded with the KV cache (each step after the
    first feeds only the newest token)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    prompts = list(prompts)
    if not prompts:
        return []
    inputs = _generation_inputs(tokenizer, prompts, chat_template, system_prompt)
    pad_id = pad_token_id(tokenizer, model)
    eos = _eos_ids(tokenizer, model)
    device = _device(model)

    class StopOnText(StoppingCriteria):
        """Marks a row finished once its decoded continuation contains a stop character."""

        def __init__(self, prompt_width: int):
            self.prompt_width = prompt_width

        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
            done = [any(c in t for c in stop_chars) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    answers: dict[int, str] = {}
    with _inference(model):
        for batch in _my_batches([len(x) for x in inputs], batch_size):
            ids, mask, _, _ = pad_sequences([inputs[i] for i in batch], pad_id, "left")
            width = ids.shape[1]
            criteria = StoppingCriteriaList([StopOnText(width)]) if stop_chars else None
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=max_new_tokens,
                min_new_tokens=None,
                pad_token_id=pad_id,
                eos_token_id=eos or None,
                stopping_criteria=criteria,
                use_cache=True,
            )
            for r, i in enumerate(batch):
                new = out[r, width:].tolist()
                for k, tok in enumerate(new):  # everything after the first EOS is padding
                    if tok in eos:
                        new = new[:k]
                        break
                text = tokenizer.decode(new, skip_special_tokens=True)
                for c in stop_chars:
                    text = text.split(c, 1)[0]
                answers[i] = text
    return _gathered(answers, len(prompts))


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    chat_template: bool | None = None,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy answers to the questions alone: stop at newline, period or EOS; text cut at the first '\\n' or '.'.

    chat_template: True wraps each question in the tokenizer's chat template (error if it has none), False feeds the
    raw question, None (auto) uses the template when the tokenizer has one. The chat form is the one R-SFT trains
    on: the template's default system prompt is left out unless `system_prompt` gives one.
    """
    texts = generate_continuations(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        chat_template=chat_template,
        batch_size=batch_size,
        stop_chars=STOP_CHARS,
        system_prompt=system_prompt,
    )
    return [t.strip() for t in texts]


# ----------------------------------------------------------------------------------------------------------------
# Exact match (SQuAD)

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 `normalize_answer`: lower, drop punctuation, drop articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0."""
    if isinstance(answers, str):
        answers = [answers]
    pred = squad_normalize(prediction)
    return float(any(pred == squad_normalize(a) for a in answers))


# ----------------------------------------------------------------------------------------------------------------
# Fluency (n-gram entropy)

_WORDS = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|m|d|ll|re|ve)\b|\w+|[^\w\s]", re.IGNORECASE)


def _word_tokenize(text: str) -> list[str]:
    return _WORDS.findall(text)


def _entropy(tokens: Sequence[str], n: int) -> float:
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in counts.values())


def text_ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """EasyEdit's `compute_n_gram_entropy` for one text: mean over n of weight_n * H_n (bits)."""
    tokens = _word_tokenize(text)
    return sum(w * _entropy(tokens, n) for n, w in zip(ns, weights)) / len(ns)


def ngram_entropy(texts: str | Sequence[str]) -> float:
    """EasyEdit's `n_gram_entropy`: arithmetic mean over texts of `text_ngram_entropy` (bigram 2/3, trigram 4/3)."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("ngram_entropy needs at least one text")
    return sum(text_ngram_entropy(t) for t in texts) / len(texts)
