"""Shared fixtures: tiny multi-shard Llama-style models built once per session, and an in-process CLI runner."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mergeedit.models.toy import LlamaShape, build_llama

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=3, heads=4, kv_heads=2, vocab=128)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """base + three fine-tune-like variants (3 shards each), a tied-embedding pair and a bf16 copy."""
    root = tmp_path_factory.mktemp("models")
    out = {
        "base": build_llama(root / "base", SHAPE),
        "a": build_llama(root / "a", SHAPE, variant=1, noise=0.5),
        "b": build_llama(root / "b", SHAPE, variant=2, noise=0.5),
        "c": build_llama(root / "c", SHAPE, variant=3, noise=0.5),
        "tied_base": build_llama(root / "tied_base", LlamaShape(**{**SHAPE.__dict__, "tied": True})),
        "tied_a": build_llama(root / "tied_a", LlamaShape(**{**SHAPE.__dict__, "tied": True}), variant=1, noise=0.5),
        "bf16": build_llama(root / "bf16", SHAPE, variant=4, noise=0.5, dtype=torch.bfloat16),
    }
    # A tokenizer file to see copied (its content is irrelevant to the merge).
    (out["base"] / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return out


def write_config(folder: Path, text: str, name: str = "merge.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `mergeedit ARGS` in this process through the real entry point (exit codes and error printing included)."""
    from mergeedit import cli

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["mergeedit", *map(str, args)])
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run



def ties_reference(base, xs: list, weights: list[float], densities: list[float], normalize=True, lam=1.0):
    """TIES as the paper/mergekit define it, written plainly: argsort top-k, weighted sign vote, disjoint mean."""
    deltas = []
    for x, w, dens in zip(xs, weights, densities):
        d = (x - base).flatten()
        if dens < 1:
            k = max(1, int(dens * d.numel()))
            mask = torch.zeros_like(d)
            mask[torch.argsort(d.abs(), descending=True)[:k]] = 1
            d = d * mask
        deltas.append(d.reshape(base.shape) * w)
    stacked = torch.stack(deltas)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == elected).float()
    mixed = (stacked * agree).sum(0)
    divisor = (torch.tensor(weights).view(-1, *[1] * base.dim()) * agree).sum(0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed
