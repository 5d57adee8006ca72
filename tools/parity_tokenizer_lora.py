#!/usr/bin/env python
"""Parity of tokenizer merges (tokenizer_source / tokenizer:) and `model+adapter` LoRA folds: mergeedit vs mergekit-yaml.

mergekit's union vocabulary order is not reproducible (set and hash-map order), so vocabulary tensors are compared token
by token through each output's tokenizer; padding rows and every other tensor are compared by position.

    python tools/parity_tokenizer_lora.py [CASE ...]     (mergekit from /tmp/mkvenv, run as a subprocess)
"""
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "tests"))
from test_tokenizer_lora import save_tokenizer, write_adapter  # noqa: E402

from mergeedit.models.toy import LlamaShape, build_llama, load_state_dict  # noqa: E402

root = Path(tempfile.mkdtemp(prefix="parity-tok-lora-"))
rng = random.Random(0)
pool = [f"w{i}" for i in range(400)]
vocabs = {"base": ["<unk>"] + pool[:200], "m1": ["<unk>"] + rng.sample(pool[:300], 220), "m2": ["<unk>"] + rng.sample(pool[100:], 180)}
models = {}
for k, (n, toks) in enumerate(vocabs.items()):
    models[n] = build_llama(root / n, LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=len(toks)), variant=None if n == "base" else k, noise=0.5, shards=2)
    save_tokenizer(models[n], toks)
lora_base = build_llama(root / "lbase", LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256), shards=2)
lora_a = build_llama(root / "la", LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256), variant=1, noise=0.5, shards=2)
write_adapter(root / "adapter", lora_base, r=4, alpha=8.0)
write_adapter(root / "adapter_rs", lora_base, r=4, alpha=8.0, use_rslora=True)
lora_bf16 = build_llama(root / "lbf16", LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256), shards=2, dtype=torch.bfloat16)
write_adapter(root / "adapter_bf16", lora_bf16, r=4, alpha=8.0)

def lin(extra):
    return {"merge_method": "linear", "base_model": str(models["base"]), "dtype": "float32",
            "models": [{"model": str(models[n]), "parameters": {"weight": w}} for n, w in zip(vocabs, (1.0, 2.0, 3.0))], **extra}
cases = {
    "union-linear": lin({"tokenizer_source": "union"}),
    "base-linear": lin({"tokenizer_source": "base"}),
    "model-linear": lin({"tokenizer_source": str(models["m2"])}),
    "tokens-block": lin({"tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": {
        "zz": {"source": {"kind": "zero"}}, "w5": {"source": str(models["m1"]), "force": True},
        vocabs["m2"][3]: {"source": {"kind": "model_token", "model": str(models["m1"]), "token": vocabs["m1"][7]}}}}}),
    "lora-passthrough": {"merge_method": "passthrough", "dtype": "float32", "models": [{"model": f"{lora_base}+{root / 'adapter'}"}]},
    "lora-bf16-passthrough": {"merge_method": "passthrough", "models": [{"model": f"{lora_bf16}+{root / 'adapter_bf16'}"}]},
    "lora-rslora-linear": {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{lora_base}+{root / 'adapter_rs'}", "parameters": {"weight": 1.0}}, {"model": str(lora_a), "parameters": {"weight": 2.0}}]},
}

def by_token(folder, _sd):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    return tok.get_vocab()

worst_all = 0.0
only = sys.argv[1:]
for name, cfg in cases.items():
    if only and name not in only: continue
    d = root / name; d.mkdir()
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    r1 = subprocess.run([str(Path(sys.executable).parent / "mergeedit"), "merge", str(d / "c.yaml"), str(d / "me")], capture_output=True, text=True)
    r2 = subprocess.run(["/tmp/mkvenv/bin/mergekit-yaml", str(d / "c.yaml"), str(d / "mk"), "--no-cuda", "--lora-merge-cache", str(d / "cache")], capture_output=True, text=True)
    if r1.returncode or r2.returncode:
        print(name, "FAILED", r1.returncode, r1.stderr[-800:], r2.returncode, r2.stderr[-1500:]); continue
    me, mk = load_state_dict(d / "me"), load_state_dict(d / "mk")
    assert set(me) == set(mk), (set(me) ^ set(mk))
    worst, note = 0.0, ""
    vocab_me = vocab_mk = None
    if "lora" not in name:
        vocab_me, vocab_mk = by_token(d / "me", me), by_token(d / "mk", mk)
        assert set(vocab_me) == set(vocab_mk), set(vocab_me) ^ set(vocab_mk)
        cm, ck = json.loads((d / "me/config.json").read_text()), json.loads((d / "mk/config.json").read_text())
        assert cm["vocab_size"] == ck["vocab_size"], (cm["vocab_size"], ck["vocab_size"])
        note = f"vocab {len(vocab_me)} rows {cm['vocab_size']}"
    for t in me:
        a, b = me[t], mk[t]
        assert a.shape == b.shape, (t, a.shape, b.shape)
        if vocab_me is not None and t in ("model.embed_tokens.weight", "lm_head.weight"):
            toks = sorted(vocab_me, key=vocab_me.get)
            ia = torch.tensor([vocab_me[x] for x in toks]); ib = torch.tensor([vocab_mk[x] for x in toks])
            diff = (a[ia] - b[ib]).abs().max().item()
            if a.shape[0] > len(toks):
                diff = max(diff, (a[len(toks):] - b[len(toks):]).abs().max().item())
        else:
            diff = (a.float() - b.float()).abs().max().item()
        worst = max(worst, diff)
    worst_all = max(worst_all, worst)
    print(f"{name:22s} max|diff| = {worst:.3g}  {note}")
print("worst", worst_all)
shutil.rmtree(root, ignore_errors=True)
