"""`tokenizer_source` / `tokenizer:`: build the output vocabulary and say, per input, where each embedding row comes from.

Semantics follow mergekit 0.1.5 (tokenizer/build.py and tokenizer/embed.py):

- `base` keeps the base model's tokenizer (the first model when there is no base_model); a model reference takes that
  model's; `union` starts from the base tokenizer and appends every other token of the inputs, then their added tokens.
  mergekit walks models in set order and vocabularies in hash order, so its union order is not reproducible; we take
  the base first, then the models in config order, each vocabulary in id order.
- `tokens:` adds missing tokens and picks the source of a token's embedding; `force` applies it to every model.
- A row is an input's own row when it has the token (and it is not forced). Otherwise it is the token's default: the
  configured source; else the only model that has it; else zeros when none has it; else the base's row when the base
  has it; else the mean over the models that have it.
- `pad_to_multiple_of` rounds the row count up; padding rows are the mean of that input's (permuted) vocabulary rows.

transformers and tokenizers are imported only when a tokenizer merge is configured (start-up time of plain merges).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..core.errors import MergeEditError
from ..io.source_reader import FILL, PAD, RowFill, RowMap, StoredTensor
from .schema import MergeConfig, ModelTokenEmbedding, TokenEmbedding, ZeroEmbedding

VOCAB_SUFFIXES = (
    "embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight", "lm_head.weight", "embed_out.weight",
)


def is_vocabulary_tensor(name: str) -> bool:
    """Tensors indexed by token id along their first dimension (input embeddings and output heads)."""
    return name.endswith(VOCAB_SUFFIXES)


def tokenizer_setting(config: MergeConfig) -> Optional[str]:
    """The configured output tokenizer source: 'union', 'base', a model reference, or None (copy the tokenizer)."""
    if config.tokenizer is not None:
        return config.tokenizer.source
    return config.tokenizer_source


def config_vocab_size(config: Optional[dict]) -> Optional[int]:
    for cfg in (config or {}, (config or {}).get("text_config") or {}):
        if isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    return None


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    from ..core.paths import require_regular_if_present
    from ..io.output_dir import SIDE_FILES

    require_regular_if_present(folder, SIDE_FILES)
    return AutoTokenizer.from_pretrained(str(folder), use_fast=True)


@dataclass
class ModelVocabulary:
    rows: dict[str, int]  # token -> embedding row, for rows below the model's vocab size
    ids: dict[str, int]  # the tokenizer's whole vocabulary (model_token sources look tokens up here)


@dataclass
class VocabularyPlan:
    tokenizer: Any  # the output tokenizer (transformers), saved with the merge
    vocab: dict[str, int]  # output token -> output row
    out_rows: int  # len(vocab) rounded up to pad_to_multiple_of
    models: dict[str, ModelVocabulary]
    tokens: dict[str, TokenEmbedding]
    base_ref: str
    where: Callable[[tuple], str]

    def __post_init__(self) -> None:
        self._tokens_by_row = sorted(self.vocab, key=self.vocab.get)
        self._perm: dict[str, torch.Tensor] = {}

    def permutation(self, ref: str) -> torch.Tensor:
        """Output row -> the model's row, -1 where it lacks the token (cached per model)."""
        if ref not in self._perm:
            have = self.models[ref].rows
            self._perm[ref] = torch.tensor([have.get(tok, -1) for tok in self._tokens_by_row], dtype=torch.int64)
        return self._perm[ref]

    def update_config(self, cfg: Optional[dict]) -> None:
        if cfg is None:
            return
        target = cfg if "vocab_size" in cfg or "text_config" not in cfg else cfg["text_config"]
        target["vocab_size"] = self.out_rows

    def row_maps(self, tensor: str, refs: list[str], stored: list[StoredTensor], base_ref: Optional[str]) -> list[RowMap]:
        """One row map per input of a vocabulary tensor, in input order."""
        n = len(self.vocab)
        perms = []
        for ref, s in zip(refs, stored):
            p = self.permutation(ref).clone()
            p[p >= s.info.shape[0]] = -1  # a tokenizer larger than the embedding: the extra tokens have no row
            perms.append(p)
        forced = torch.zeros(n, dtype=torch.bool)
        for tok, cfg in self.tokens.items():
            if cfg.force:
                forced[self.vocab[tok]] = True
        needs_default = forced | (torch.stack(perms) < 0).any(dim=0)
        default_rows = torch.nonzero(needs_default).flatten().tolist()
        defaults = {row: self._default(tensor, row, refs, stored, perms, base_ref) for row in default_rows}
        maps = []
        pad = torch.full((self.out_rows - n,), PAD, dtype=torch.int64)
        for p in perms:
            take_default = needs_default & (forced | (p < 0))
            rows = torch.where(take_default, torch.full_like(p, FILL), p)
            fills = {row: defaults[row] for row in torch.nonzero(take_default).flatten().tolist()}
            maps.append(RowMap(torch.cat([rows, pad]), fills, n))
        return maps

    def _default(
        self, tensor: str, row: int, refs: list[str], stored: list[StoredTensor], perms: list[torch.Tensor], base_ref: Optional[str]
    ) -> RowFill:
        """The embedding a model lacking (or forced off) the token at `row` gets, as mergekit's rules pick it."""
        token = self._tokens_by_row[row]
        cfg = self.tokens.get(token)
        has = [k for k, p in enumerate(perms) if p[row] >= 0]
        if cfg is None:
            if len(has) == 1:
                return RowFill(((stored[has[0]], int(perms[has[0]][row])),))
            if not has:
                return RowFill(())
            if base_ref in refs and perms[refs.index(base_ref)][row] >= 0:
                k = refs.index(base_ref)
                return RowFill(((stored[k], int(perms[k][row])),))
            return RowFill(tuple((stored[k], int(perms[k][row])) for k in has))
        where = self.where(("tokenizer", "tokens", token))
        source = cfg.source
        if source is None:
            raise MergeEditError(
                f"{where}: token {token!r} needs an embedding for '{tensor}' but has no 'source'; give a model, or {{kind: zero}}"
            )
        if isinstance(source, ZeroEmbedding):
            return RowFill(())
        model = source.model if isinstance(source, ModelTokenEmbedding) else source
        if model not in refs:
            raise MergeEditError(
                f"{where}: source model '{model}' is not an input of '{tensor}' (inputs: {', '.join(refs)}); name one of them"
            )
        k = refs.index(model)
        if isinstance(source, ModelTokenEmbedding):
            src_row = source.token_id if source.token_id is not None else self.models[model].ids.get(source.token, -1)
            if source.token is not None and src_row < 0:
                raise MergeEditError(f"{where}: token {source.token!r} is not in the vocabulary of '{model}'")
            if not 0 <= src_row < stored[k].info.shape[0]:
                raise MergeEditError(f"{where}: token_id {src_row} is outside the {stored[k].info.shape[0]} rows of '{model}' {tensor}")
            return RowFill(((stored[k], src_row),))
        if perms[k][row] < 0:
            raise MergeEditError(f"{where}: token {token!r} is not in the vocabulary of its source model '{model}'; choose another source")
        return RowFill(((stored[k], int(perms[k][row])),))


def _model_vocabulary(tokenizer, vocab_size: Optional[int]) -> ModelVocabulary:
    ids = tokenizer.get_vocab()
    limit = vocab_size if vocab_size is not None else len(ids)
    return ModelVocabulary({tok: i for tok, i in ids.items() if i < limit}, ids)


def _union_tokenizer(base_tok, ordered: list[tuple[Any, ModelVocabulary]]):
    """The base tokenizer (extended in place) plus every other token, in model order and id order, then the added tokens."""
    base_vocab = base_tok.get_vocab()
    added: dict[str, Any] = {}
    for tok, vocab in ordered:
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if vocab.rows.get(info.content) == i:  # within the model's vocab size
                added.setdefault(info.content, info)
    plain: dict[str, None] = {}
    for _, vocab in ordered:
        for t in sorted(vocab.rows, key=vocab.rows.get):
            if t not in added and t not in base_vocab:
                plain.setdefault(t, None)
    for t in plain:
        base_tok.add_tokens(t)
    for info in added.values():
        base_tok.add_tokens(info)
    return base_tok


def plan_vocabulary(
    config: MergeConfig,
    refs: list[str],
    folders: dict[str, Path],
    model_configs: dict[str, Optional[dict]],
    where: Callable[[tuple], str],
    warnings: list[str],
) -> VocabularyPlan:
    """Load the input tokenizers and build the output tokenizer and vocabulary for the configured source.

    `refs` lists the input models with the base (or first model) first; `folders` also holds a model-reference source.
    """
    setting = tokenizer_setting(config)
    path = ("tokenizer", "source") if config.tokenizer is not None else ("tokenizer_source",)
    base_ref = refs[0]
    tokenizers, vocabs = _input_vocabularies(refs, folders, model_configs, lambda: where(path), warnings)
    beyond = len(vocabs[base_ref].ids) - len(vocabs[base_ref].rows)
    if beyond and setting in ("base", "union"):
        raise MergeEditError(
            f"{where(path)}: the tokenizer of '{base_ref}' has {beyond} tokens beyond its vocab_size; trim the tokenizer or choose another source"
        )
    out_tok = _output_tokenizer(setting, refs, tokenizers, vocabs, folders, lambda: where(path))
    tokens = dict((config.tokenizer.tokens or {}) if config.tokenizer else {})
    existing = set(out_tok.get_vocab())
    for tok in tokens:
        if tok not in existing:
            out_tok.add_tokens(tok)
            existing.add(tok)
    vocab = out_tok.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise MergeEditError(f"{where(path)}: the output tokenizer's ids are not 0..{len(vocab) - 1} without gaps; its rows cannot be laid out")
    multiple = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
    out_rows = -(-len(vocab) // multiple) * multiple if multiple else len(vocab)
    return VocabularyPlan(out_tok, vocab, out_rows, vocabs, tokens, base_ref, where)


def _input_vocabularies(refs, folders, model_configs, where: Callable[[], str], warnings: list[str]) -> tuple[dict, dict]:
    """(tokenizer, vocabulary) of every input; an input other than the base without a usable tokenizer is assumed to
    share the base's (with a warning)."""
    base_ref = refs[0]
    tokenizers: dict[str, Any] = {}
    vocabs: dict[str, ModelVocabulary] = {}
    for ref in refs:
        try:
            tokenizers[ref] = load_tokenizer(folders[ref])
        except Exception as exc:  # noqa: BLE001 - any loader failure means "no usable tokenizer here"
            if ref == base_ref:
                raise MergeEditError(
                    f"{where()}: cannot load the tokenizer of '{ref}' from {folders[ref]} ({exc.__class__.__name__}); add tokenizer files there"
                ) from None
            warnings.append(f"{where()}: cannot load the tokenizer of '{ref}' ({exc.__class__.__name__}); assuming it is '{base_ref}'s")
            continue
        vocabs[ref] = _model_vocabulary(tokenizers[ref], config_vocab_size(model_configs.get(ref)))
    for ref in refs:
        vocabs.setdefault(ref, ModelVocabulary(dict(vocabs[base_ref].rows), vocabs[base_ref].ids))
    return tokenizers, vocabs


def _output_tokenizer(setting: str, refs, tokenizers: dict, vocabs: dict, folders, where: Callable[[], str]):
    """The tokenizer the output gets: the base's, the union of the inputs', or one named model's."""
    if setting == "base":
        return tokenizers[refs[0]]
    if setting == "union":
        return _union_tokenizer(tokenizers[refs[0]], [(tokenizers[r], vocabs[r]) for r in refs if r in tokenizers])
    if setting in tokenizers:  # one of the inputs, already loaded
        return tokenizers[setting]
    try:
        return load_tokenizer(folders[setting])
    except Exception as exc:  # noqa: BLE001
        raise MergeEditError(
            f"{where()}: cannot load a tokenizer from '{setting}' ({exc.__class__.__name__}); point it at a folder with tokenizer files"
        ) from None
