#!/usr/bin/env python
"""Numeric parity check: mergeedit vs. mergekit on tiny sharded Llama-style models.

mergekit is an outside oracle here: it is run as a subprocess from its own virtual environment (never imported).
Both tools get the same YAML config; every output tensor is compared.

    python tools/mergekit_parity.py [--mergekit /tmp/mkvenv/bin/mergekit-yaml] [--mergeedit PATH] [--keep]
                                    [--work-dir DIR] [--only NAME ...] [--seed N] [--dtypes float32 bf16 fp16]

Verdicts:
  exact       deterministic config, float32 in and out: max |a - b| <= 1e-5 on every tensor.
  fp16-out    deterministic config, float32 compute, float16 output: the same 1e-5 test, but a tensor element may
              differ by one float16 ulp at its magnitude (a float32 value sitting on a rounding boundary).
  bf16, fp16  a deterministic case again with `dtype: bfloat16` / `dtype: float16` (every exact case gets both): the
              float32 cases' test, max |a - b| <= 1e-5 on every tensor; the note says whether the output is
              bit-identical or how many elements differ (and by how many units in the last place).
  structural  DARE / DELLA at density < 1 (mergekit's RNG differs from ours): same tensor names, shapes and dtypes; mergeedit
              reproducible for a fixed seed; the mean |out - base| is reported for both tools as an extra sanity note.
  TIE         (not a failure unless --strict-ties) a deterministic config whose every out-of-tolerance element is
              explained by an exact tie (in the case's dtype) at a top-k boundary: ties/breadcrumbs magnitudes (both
              tools keep exactly k; mergeedit reproduces mergekit's choice among the tied entries, the one torch's
              whole-tensor argsort/sort makes, for tensors up to 2^27 elements and keeps the lowest positions above
              that, so TIE can only appear there), or sce's variance selection (likewise with torch.topk: a tensor
              whose k-th largest variance is tied across the boundary; its kept set, so its weights, differ; other
              tensors must match).
Extra checks per config: same tensor names, shapes, dtypes in both outputs; `num_hidden_layers` of both config.json
files equals the expected count; expected absence of `lm_head.weight` for tied embeddings.

Exit status 1 if any config fails (or a tool errors; TIE too with --strict-ties); 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from mergeedit.models.toy import LlamaShape, build_llama

SHAPE = LlamaShape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=256)
SHAPE_TIED = LlamaShape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=256, tied=True)
EXACT_TOL = 1e-5
TOPK_METHODS = {"ties", "breadcrumbs", "breadcrumbs_ties"}  # magnitude top-k sparsification


@dataclass
class Case:
    name: str
    config: dict  # model names are placeholders "@base", "@a", ... resolved against the built model folders
    kind: str  # exact | fp16-out | bf16 | structural
    models: str = "untied"  # which model set to use: untied | tied
    layers: Optional[int] = None  # expected num_hidden_layers of the output (default: input layer count)
    expect_lm_head: bool = True

    @property
    def method(self) -> str:
        return self.config["merge_method"]


def _models(*specs: tuple[str, dict]) -> list[dict]:
    return [{"model": m, **({"parameters": p} if p else {})} for m, p in specs]


def build_cases() -> list[Case]:
    C: list[Case] = []
    # ---- linear ------------------------------------------------------------------------------------------------
    C.append(Case("linear-normalize", {
        "merge_method": "linear",
        "models": _models(("@a", {"weight": 1.0}), ("@b", {"weight": 0.5}), ("@c", {"weight": [0.2, 0.8]})),
        "dtype": "float32",
    }, "exact"))
    C.append(Case("linear-no-normalize", {
        "merge_method": "linear",
        "models": _models(("@a", {"weight": 0.5}), ("@b", {"weight": 0.3}), ("@c", {"weight": [0.1, 0.4]})),
        "parameters": {"normalize": False},
        "dtype": "float32",
    }, "exact"))
    # ---- task arithmetic -----------------------------------------------------------------------------------------
    C.append(Case("task-arithmetic-lambda0.7", {
        "merge_method": "task_arithmetic",
        "base_model": "@base",
        "models": _models(("@a", {"weight": 0.5}), ("@b", {"weight": 0.3}), ("@c", {"weight": [0.2, 0.6]})),
        "parameters": {"lambda": 0.7},
        "dtype": "float32",
    }, "exact"))
    # ---- ties ----------------------------------------------------------------------------------------------------
    ties_models = _models(("@a", {"weight": 1.0, "density": 0.3}),
                          ("@b", {"weight": [0.2, 0.8], "density": 0.7}),
                          ("@c", {"weight": 0.5, "density": 0.5}))
    C.append(Case("ties-normalize", {
        "merge_method": "ties", "base_model": "@base", "models": ties_models, "dtype": "float32",
    }, "exact"))
    C.append(Case("ties-no-normalize", {
        "merge_method": "ties", "base_model": "@base", "models": ties_models,
        "parameters": {"normalize": False}, "dtype": "float32",
    }, "exact"))
    C.append(Case("ties-density-filters", {
        "merge_method": "ties", "base_model": "@base",
        "models": _models(("@a", {"weight": 0.7}), ("@b", {"weight": [0.2, 0.8]})),
        "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"filter": "self_attn", "value": 0.7}, {"value": 0.5}]},
        "dtype": "float32",
    }, "exact"))
    # ---- DARE ----------------------------------------------------------------------------------------------------
    for method in ("dare_ties", "dare_linear"):
        for density, kind in ((1.0, "exact"), (0.5, "structural")):
            C.append(Case(f"{method.replace('_', '-')}-d{density}", {
                "merge_method": method, "base_model": "@base",
                "models": _models(("@a", {"weight": 0.6, "density": density}),
                                  ("@b", {"weight": [0.2, 0.8], "density": density}),
                                  ("@c", {"weight": 0.4, "density": density})),
                "dtype": "float32",
            }, kind))
    # ---- passthrough stacking layers -----------------------------------------------------------------------------
    C.append(Case("passthrough-stack-6", {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "@a", "layer_range": [0, 3]}]},
            {"sources": [{"model": "@b", "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }, "exact", layers=6))
    # ---- slices with per-slice ties and per-source parameters ----------------------------------------------------
    C.append(Case("slices-ties-per-source", {
        "merge_method": "ties", "base_model": "@base",
        "slices": [
            {"sources": [
                {"model": "@base", "layer_range": [0, 2]},
                {"model": "@a", "layer_range": [0, 2], "parameters": {"weight": 0.8, "density": 0.4}},
                {"model": "@b", "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.8], "density": 0.6}},
            ]},
            {"sources": [
                {"model": "@base", "layer_range": [2, 4]},
                {"model": "@a", "layer_range": [2, 4], "parameters": {"weight": 0.3}},
                {"model": "@b", "layer_range": [2, 4], "parameters": {"weight": 0.9,
                                                                       "density": [{"filter": "mlp", "value": 0.2}, {"value": 0.8}]}},
            ], "parameters": {"density": 0.5, "normalize": False}},
        ],
        "dtype": "float32",
    }, "exact"))
    # ---- dtype / out_dtype ---------------------------------------------------------------------------------------
    C.append(Case("ties-out-dtype-fp16", {
        "merge_method": "ties", "base_model": "@base", "models": ties_models,
        "dtype": "float32", "out_dtype": "float16",
    }, "fp16-out"))
    # ---- tied embeddings -----------------------------------------------------------------------------------------
    C.append(Case("ties-tied-embeddings", {
        "merge_method": "ties", "base_model": "@base", "models": ties_models, "dtype": "float32",
    }, "exact", models="tied", expect_lm_head=False))
    C.append(Case("linear-tied-embeddings", {
        "merge_method": "linear",
        "models": _models(("@a", {"weight": 1.0}), ("@b", {"weight": [0.2, 0.8]})),
        "dtype": "float32",
    }, "exact", models="tied", expect_lm_head=False))
    # ---- spherical / model_stock (part A) ----
    # The toy variants are nearly parallel to the base (slerp's lerp fallback); slices pairing different layers give
    # near-orthogonal matrices, so the spherical path and karcher's iteration run too.
    cross_layer = [{"model": "@base", "layer_range": [0, 2]}, {"model": "@b", "layer_range": [2, 4]}]
    t_filters = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
    C.append(Case("slerp-t-gradient", {
        "merge_method": "slerp", "base_model": "@base", "models": _models(("@base", None), ("@a", None)),
        "parameters": {"t": [0, 0.5, 0.3, 0.7, 1]}, "dtype": "float32",
    }, "exact"))
    C.append(Case("slerp-cross-layer-filters", {
        "merge_method": "slerp", "base_model": "@base", "slices": [{"sources": cross_layer}],
        "parameters": {"t": t_filters}, "dtype": "float32",
    }, "exact", layers=2))
    nu_models = _models(("@a", {"weight": 0.3}), ("@b", {"weight": [0.2, 0.9]}))
    for name, extra in (("nuslerp-flatten", {}), ("nuslerp-base", {"base_model": "@base"}),
                        ("nuslerp-base-rows", {"base_model": "@base", "parameters": {"nuslerp_flatten": False}}),
                        ("nuslerp-base-row-wise", {"base_model": "@base",
                                                   "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}})):
        C.append(Case(name, {"merge_method": "nuslerp", "models": nu_models, **extra, "dtype": "float32"}, "exact"))
    ms_models = _models(("@a", {"weight": 0.5}), ("@b", {"weight": 0.3}), ("@c", {"weight": [0.2, 0.8]}))
    C.append(Case("multislerp", {"merge_method": "multislerp", "models": ms_models, "dtype": "float32"}, "exact"))
    C.append(Case("multislerp-base", {
        "merge_method": "multislerp", "base_model": "@base", "models": ms_models, "dtype": "float32",
    }, "exact"))
    C.append(Case("multislerp-base-unnormalized", {
        "merge_method": "multislerp", "base_model": "@base", "models": ms_models,
        "parameters": {"normalize_weights": False}, "dtype": "float32",
    }, "exact"))
    # karcher: mergekit takes arccos of float32 dot products, which near 1 resolve angles only to ~3.5e-4 rad; a model
    # closer than that to the mean gets theta = 0 < tol and is dropped from the tangent step, so on nearly parallel
    # tensors (the toy fine-tunes' 1-D norms) mergekit is off by ~5e-4 while mergeedit matches mergekit's own algorithm
    # in float64 to 1e-7. These cases pair different layers (well-separated directions); the last slice has a single
    # source, so the final norm (the same tensor in every model) is copied rather than averaged.
    karcher_slices = [
        {"sources": [{"model": "@a", "layer_range": [0, 2]}, {"model": "@b", "layer_range": [1, 3]},
                     {"model": "@c", "layer_range": [2, 4]}]},
        {"sources": [{"model": "@a", "layer_range": [3, 4]}]},
    ]
    C.append(Case("karcher-cross-layer", {"merge_method": "karcher", "slices": karcher_slices, "dtype": "float32"}, "exact", layers=3))
    C.append(Case("karcher-cross-layer-base-iter", {
        "merge_method": "karcher", "base_model": "@a", "slices": karcher_slices,
        "parameters": {"max_iter": 20, "tol": 1e-6}, "dtype": "float32",
    }, "exact", layers=3))
    stock_models = _models(("@a", None), ("@b", None), ("@c", None))
    C.append(Case("model-stock", {
        "merge_method": "model_stock", "base_model": "@base", "models": stock_models, "dtype": "float32",
    }, "exact"))
    C.append(Case("model-stock-filter-wise", {
        "merge_method": "model_stock", "base_model": "@base", "models": stock_models,
        "parameters": {"filter_wise": True}, "dtype": "float32",
    }, "exact"))
    # ---- breadcrumbs / della / sce (part B) ----
    # Default gamma 0.01 drops no outliers from the 64-element norms (int(0.64) = 0): mergekit releases before its fix
    # zeroed those deltas; 0.1.5 as installed counts correctly, so that regime is compared too.
    crumb_models = _models(("@a", {"weight": 1.0, "density": 0.5}),
                           ("@b", {"weight": [0.2, 0.8], "density": 0.7, "gamma": 0.05}),
                           ("@c", {"weight": 0.5, "density": [0.3, 0.6], "gamma": 0.1}))
    C.append(Case("breadcrumbs", {
        "merge_method": "breadcrumbs", "base_model": "@base", "models": crumb_models, "dtype": "float32",
    }, "exact"))
    C.append(Case("breadcrumbs-ties-normalize-rescale", {
        "merge_method": "breadcrumbs_ties", "base_model": "@base", "models": crumb_models,
        "parameters": {"normalize": True, "rescale": True}, "dtype": "float32",
    }, "exact"))
    C.append(Case("breadcrumbs-ties-global-gamma", {
        "merge_method": "breadcrumbs_ties", "base_model": "@base",
        "models": _models(("@a", {"weight": 0.7}), ("@b", {"weight": 0.4})),
        "parameters": {"density": 0.4, "gamma": 0.02, "lambda": 0.8}, "dtype": "float32",
    }, "exact"))
    for method in ("della", "della_linear"):
        for density, kind in ((1.0, "exact"), (0.5, "structural")):
            C.append(Case(f"{method.replace('_', '-')}-d{density}", {
                "merge_method": method, "base_model": "@base",
                "models": _models(("@a", {"weight": 0.6, "density": density}),
                                  ("@b", {"weight": [0.2, 0.8], "density": density, "epsilon": 0.1}),
                                  ("@c", {"weight": 0.4, "density": density})),
                "dtype": "float32",
            }, kind))
    for topk in (1.0, 0.5, 0.1):
        C.append(Case(f"sce-topk{topk}", {
            "merge_method": "sce", "base_model": "@base", "models": _models(("@a", None), ("@b", None), ("@c", None)),
            "parameters": {"select_topk": topk}, "dtype": "float32",
        }, "exact"))
    # ---- ram / nearswap / arcee_fusion (part C) ----
    # The toy fine-tunes change every entry by ~2e-4 (norms ~5e-4): epsilon 2e-4 makes a real mix of entries changed by
    # none, one or several models; nearswap's t 1e-4 mixes swapped and partly moved entries.
    ram_models = _models(("@a", None), ("@b", None), ("@c", None))
    C.append(Case("ram-default", {
        "merge_method": "ram", "base_model": "@base", "models": ram_models, "dtype": "float32",
    }, "exact"))
    C.append(Case("ram-eps2e-4", {
        "merge_method": "ram", "base_model": "@base", "models": ram_models,
        "parameters": {"epsilon": 2e-4}, "dtype": "float32",
    }, "exact"))
    C.append(Case("ramplus-tl-default", {
        "merge_method": "ramplus_tl", "base_model": "@base", "models": ram_models, "dtype": "float32",
    }, "exact"))
    C.append(Case("ramplus-tl-eps2e-4-r0.5-alpha1", {
        "merge_method": "ramplus_tl", "base_model": "@base", "models": ram_models,
        "parameters": {"epsilon": 2e-4, "r": 0.5, "alpha": 1.0}, "dtype": "float32",
    }, "exact"))
    C.append(Case("nearswap-t1e-4", {
        "merge_method": "nearswap", "base_model": "@base", "models": _models(("@a", None)),
        "parameters": {"t": 1e-4}, "dtype": "float32",
    }, "exact"))
    C.append(Case("nearswap-t-gradient", {
        "merge_method": "nearswap", "base_model": "@base", "models": _models(("@base", None), ("@b", None)),
        "parameters": {"t": [1e-5, 5e-4]}, "dtype": "float32",
    }, "exact"))
    C.append(Case("arcee-fusion", {
        "merge_method": "arcee_fusion", "base_model": "@base", "models": _models(("@a", None)), "dtype": "float32",
    }, "exact"))
    C.append(Case("arcee-fusion-tied-embeddings", {
        "merge_method": "arcee_fusion", "base_model": "@base", "models": _models(("@base", None), ("@c", None)),
        "dtype": "float32",
    }, "exact", models="tied", expect_lm_head=False))
    # the issue's case: mergekit elects TIES' sign from a bfloat16 sum, so near-cancelling deltas decide it there
    C.append(Case("ties-int8-mask-no-normalize", {
        "merge_method": "ties", "base_model": "@base",
        "models": _models(("@a", {"weight": 0.6, "density": 0.4}), ("@b", {"weight": 0.5, "density": 0.6})),
        "parameters": {"int8_mask": True, "normalize": False}, "dtype": "float32",
    }, "exact"))
    return C + [low for c in C if c.kind in ("exact", "structural") for low in low_precision_variants(c)]


LOW_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# methods whose mergekit result is float32 even in a bf16/fp16 config (ramplus_tl: a float32 lambda tensor promotes
# it; arcee_fusion: its mask is .float(); with no out_dtype mergekit writes what it computed); mergeedit writes the
# configured dtype
FLOAT32_OUTPUT = {"ramplus_tl", "arcee_fusion"}


def low_precision_variants(case: Case) -> list[Case]:
    """The case with `dtype: bfloat16` and `dtype: float16` (inputs cast on load, both tools computing as they do in
    that dtype, output in it): checked at the float32 tolerance, with a count of the elements that are not bit-equal."""
    out = []
    for tag, dtype in LOW_DTYPES.items():
        config = {**case.config, "dtype": dtype}
        kind = case.kind if case.kind == "structural" else tag
        out.append(Case(f"{case.name}@{tag}", config, kind, case.models, case.layers, case.expect_lm_head))
    return out


# ---------------------------------------------------------------------------------------------------------------
def resolve(obj: Any, paths: dict[str, str]) -> Any:
    if isinstance(obj, dict):
        return {k: resolve(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(v, paths) for v in obj]
    if isinstance(obj, str) and obj.startswith("@"):
        return paths[obj[1:]]
    return obj


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no .safetensors files in {folder}")
    for f in files:
        part = load_file(f)
        dup = set(part) & set(out)
        if dup:
            raise RuntimeError(f"tensor(s) in more than one shard of {folder}: {sorted(dup)[:3]}")
        out.update(part)
    return out


def run_tool(cmd: list[str], log: Path) -> tuple[bool, float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n--- rc={p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return p.returncode == 0, dt, " | ".join(tail)


def num_layers(folder: Path) -> Optional[int]:
    cfg = folder / "config.json"
    if not cfg.exists():
        return None
    return json.loads(cfg.read_text()).get("num_hidden_layers")


def fp16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of float16 values at |x| (normal range; subnormal spacing 2^-24)."""
    ax = x.abs().float().clamp_min(2.0 ** -14)
    return torch.exp2(torch.floor(torch.log2(ax)) - 10)



def max_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Most units in the last place between same-dtype bfloat16/float16 values (as ordered integers)."""
    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def _density_candidates(obj: Any, under_density: bool = False, key: str = "density") -> set[float]:
    """Every value of parameter `key` (density) a config can produce: scalars, filter-list values, and gradient points
    at t = i/(n-1)."""
    out: set[float] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                out |= _density_candidates(v, True, key)
            elif k == "value" and under_density:
                out |= _density_candidates(v, True, key)
            else:
                out |= _density_candidates(v, under_density, key)
    elif isinstance(obj, list):
        if under_density and obj and all(isinstance(v, (int, float)) for v in obj):
            pts = [float(v) for v in obj]
            for n in range(2, 17):
                for i in range(n):
                    t = i / (n - 1) * (len(pts) - 1)
                    j = min(int(t), len(pts) - 2) if len(pts) > 1 else 0
                    out.add(pts[j] + (pts[j + 1] - pts[j]) * (t - j) if len(pts) > 1 else pts[0])
        else:
            for v in obj:
                out |= _density_candidates(v, under_density, key)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and under_density:
        out.add(float(obj))
    return out


def _sets_true(obj: Any, key: str) -> bool:
    """Whether a config sets boolean parameter `key` to true anywhere."""
    if isinstance(obj, dict):
        return any((k == key and v is True) or _sets_true(v, key) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_sets_true(v, key) for v in obj)
    return False


def _sources_for(config: dict, name: str) -> list[tuple[str, str, str]]:
    """(model, base, source tensor name) for the non-base inputs that feed output tensor `name`."""
    base = config.get("base_model")
    if "models" in config:
        return [(m["model"], base, name) for m in config["models"] if m["model"] != base]
    parts = name.split(".")
    out = []
    if name.startswith("model.layers."):
        j, offset = int(parts[2]), 0
        for sl in config["slices"]:
            a, b = sl["sources"][0]["layer_range"]
            if offset <= j < offset + (b - a):
                sbase = sl.get("base_model", base)
                for src in sl["sources"]:
                    if src["model"] != sbase:
                        lo = src["layer_range"][0]
                        out.append((src["model"], sbase, ".".join(parts[:2] + [str(lo + j - offset)] + parts[3:])))
                return out
            offset += b - a
        return out
    for sl in config["slices"]:  # embeddings / final norm / lm_head: any source may have fed them
        sbase = sl.get("base_model", base)
        out += [(src["model"], sbase, name) for src in sl["sources"] if src["model"] != sbase]
    return out


class TieExplainer:
    """Is a differing element explained by an exact tie at a top-k magnitude boundary?

    mergeedit keeps every |delta| >= the k-th largest magnitude (k = int(density * numel)); mergekit keeps exactly k
    via argsort, so when the k-th and (k+1)-th magnitudes are equal the tools keep different sets. An element counts as
    explained when, for some non-base input, its |delta| there straddles a keep boundary the config can produce, with
    at least one more element of that tensor at the same magnitude on the other side (count(>) < k < count(>=)).
    Breadcrumbs have two boundaries (the gamma outliers dropped from the top, then `density` kept). The deltas are
    ranked in the case's dtype, as both tools rank them; in bfloat16/float16 equal magnitudes are common.

    With rescale, a tie resolved differently also changes that input's kept L1 norm, so its rescale factor may differ
    in the last place: then any element of the tensor may move by that much of its delta (`beyond_rescale_slack`).
    """

    def __init__(self, config: dict) -> None:
        self.config = config
        self.densities = sorted(_density_candidates(config)) or [1.0]
        self.breadcrumbs = config["merge_method"].startswith("breadcrumbs")
        self.gammas = sorted(_density_candidates(config, key="gamma") | {0.01}) if self.breadcrumbs else [0.0]
        self.rescales = _sets_true(config, "rescale")
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def _sd(self, path: str) -> dict[str, torch.Tensor]:
        if path not in self.cache:
            self.cache[path] = load_folder(Path(path))
        return self.cache[path]

    def _boundaries(self, n: int) -> set[int]:
        """Keep counts from the top at which the kept set ends, for every density (and gamma) the config can produce."""
        out: set[int] = set()
        for d in self.densities:
            if not 0 < d < 1:
                continue
            if not self.breadcrumbs:
                out.add(max(1, int(d * n)))
                continue
            for g in self.gammas:
                target, top = int(d * n), int(g * n)
                dropped_top = n - max(0, n - target - top) - target  # mergekit keeps ascending ranks [n_bot, n_bot + target)
                out |= {dropped_top, dropped_top + target}
        return out

    def unexplained(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """The positions that no top-k tie explains."""
        srcs = _sources_for(self.config, name)
        mags = []
        for model, base, src_name in srcs:
            x = self._sd(model).get(src_name) if base is not None else None
            b = self._sd(base).get(src_name) if base is not None else None
            if x is None or b is None:
                return positions
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.config.get("dtype"), torch.float32)
            mags.append((x.to(dtype) - b.to(dtype)).abs().float().flatten())  # the delta both tools rank, in its dtype
        left = []
        for p in positions.tolist():
            ok = False
            for w in mags:
                v = w[p]
                gt, ge = int((w > v).sum()), int((w >= v).sum())
                if ge - gt >= 2 and any(gt < k < ge for k in self._boundaries(w.numel())):
                    ok = True
                    break
            if not ok:
                left.append(p)
        return torch.tensor(left, dtype=torch.long)

    def beyond_rescale_slack(self, name: str, positions: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The positions where the outputs differ by more than a rescale factor one ulp apart can explain: twice the
        dtype's relative spacing of the merged delta |out - base|, plus two ulp of the output."""
        srcs = _sources_for(self.config, name)
        if not srcs or srcs[0][1] is None or self._sd(srcs[0][1]).get(srcs[0][2]) is None:
            return positions
        base = self._sd(srcs[0][1])[srcs[0][2]].to(x.dtype).double().flatten()[positions]
        a, b = x.double().flatten()[positions], y.double().flatten()[positions]
        rel = torch.finfo(x.dtype).eps  # spacing relative to the value, at worst
        ulp = torch.maximum(a.abs(), b.abs()) * rel + torch.finfo(x.dtype).tiny
        slack = 2 * rel * torch.maximum((a - base).abs(), (b - base).abs()) + 2 * ulp
        return positions[(a - b).abs() > slack]

    def explains(self, name: str, positions: torch.Tensor) -> bool:
        return self.unexplained(name, positions).numel() == 0


class SceTieExplainer:
    """sce with 0 < select_topk < 1: is a tensor's difference explained by a tie at its variance selection boundary?

    Both tools keep exactly k = int(select_topk * count(var != 0)) positions of largest variance across the task
    vectors (the variance computed in the case's dtype, as both compute it). When the k-th largest variance is tied
    across the boundary (count(>) < k < count(>=)), mergekit's torch.topk keeps a subset its partial sort picks;
    mergeedit makes the same topk call up to 2^27 elements (selection.TieOrder), keeps the tied positions lowest in
    the tensor above that; where the kept entries differ, so do the per-model
    weights (mean square of each selected task vector), which every element of that tensor is scaled by. So every
    differing element of such a tensor counts as explained; a tensor without a straddling tie must match.
    """

    rescales = False

    def __init__(self, config: dict) -> None:
        self.config = config
        self.topks = sorted(_density_candidates(config, key="select_topk"))
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def _sd(self, path: str) -> dict[str, torch.Tensor]:
        if path not in self.cache:
            self.cache[path] = load_folder(Path(path))
        return self.cache[path]

    def straddles(self, name: str) -> bool:
        srcs = _sources_for(self.config, name)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.config.get("dtype"), torch.float32)
        if not srcs or srcs[0][1] is None:
            return False
        base = self._sd(srcs[0][1]).get(srcs[0][2])
        xs = [self._sd(model).get(src_name) for model, _, src_name in srcs]
        if base is None or any(x is None for x in xs):
            return False
        tvs = torch.stack([x.to(dtype) - base.to(dtype) for x in xs])
        var = torch.var(tvs, dim=0, unbiased=False).abs().float().flatten()
        for topk in self.topks:
            k = int(torch.count_nonzero(var) * topk)
            if not 0 < topk < 1 or k == 0:
                continue
            v = torch.topk(var, k).values[-1]
            if int((var > v).sum()) < k < int((var >= v).sum()):
                return True
        return False

    def unexplained(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        return positions[:0] if self.straddles(name) else positions

    def explains(self, name: str, positions: torch.Tensor) -> bool:
        return self.unexplained(name, positions).numel() == 0


@dataclass
class Result:
    case: Case
    compared: int = 0
    max_diff: Optional[float] = None
    worst: str = ""
    verdict: str = "FAIL"
    note: str = ""
    t_me: float = 0.0
    t_mk: float = 0.0


def compare(case: Case, me_out: Path, mk_out: Path, base: Optional[dict[str, torch.Tensor]],
            rerun: Optional[Callable[[], Optional[Path]]], config: dict) -> Result:
    r = Result(case)
    explainer = TieExplainer(config) if case.method in TOPK_METHODS else SceTieExplainer(config) if case.method == "sce" else None
    tie_explained: list[str] = []
    a, b = load_folder(me_out), load_folder(mk_out)
    problems: list[str] = []
    notes: list[str] = []
    only_me, only_mk = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_me:
        problems.append(f"only in mergeedit: {only_me[:4]}{'...' if len(only_me) > 4 else ''} ({len(only_me)})")
    if only_mk:
        problems.append(f"only in mergekit: {only_mk[:4]}{'...' if len(only_mk) > 4 else ''} ({len(only_mk)})")
    if not case.expect_lm_head:
        for label, sd in (("mergeedit", a), ("mergekit", b)):
            if "lm_head.weight" in sd:
                problems.append(f"{label} wrote lm_head.weight for tied embeddings")
    want_layers = case.layers if case.layers is not None else SHAPE.layers
    for label, folder in (("mergeedit", me_out), ("mergekit", mk_out)):
        n = num_layers(folder)
        if n != want_layers:
            problems.append(f"{label} config.json num_hidden_layers={n}, expected {want_layers}")
    layer_ids = {int(k.split(".")[2]) for k in a if k.startswith("model.layers.")}
    if len(layer_ids) != want_layers:
        problems.append(f"mergeedit wrote {len(layer_ids)} layers of tensors, expected {want_layers}")

    max_diff, worst = 0.0, ""
    float32_out: set[str] = set()
    low_stats = [0, 0, 0]  # bf16/fp16: elements not bit-equal, elements, most units in the last place between them
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            problems.append(f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        if x.dtype != y.dtype and case.kind in LOW_DTYPES and case.method in FLOAT32_OUTPUT and y.dtype == torch.float32:
            float32_out.add(case.method)
            y = y.to(x.dtype)  # mergekit's float32 result, rounded to the configured dtype as mergeedit writes it
        elif x.dtype != y.dtype:
            problems.append(f"{name}: dtype {x.dtype} vs {y.dtype}")
        r.compared += 1
        if case.kind == "structural":
            continue
        d = (x.double() - y.double()).abs()
        md = float(d.max()) if d.numel() else 0.0
        if md > max_diff:
            max_diff, worst = md, name
        if case.kind == "exact":
            if md > EXACT_TOL:
                bad = (d > EXACT_TOL).flatten().nonzero().flatten()
                if explainer is not None and explainer.explains(name, bad):
                    tie_explained.append(f"{name} ({len(bad)} el, {md:.3g})")
                else:
                    problems.append(f"{name}: max diff {md:.3g} ({len(bad)} elements)")
        elif case.kind == "fp16-out":
            bad = d > torch.maximum(torch.full_like(d, EXACT_TOL), fp16_ulp(y).double() * 1.0001)
            if bool(bad.any()):
                pos = bad.flatten().nonzero().flatten()
                if explainer is not None and explainer.explains(name, pos):
                    tie_explained.append(f"{name} ({len(pos)} el, {md:.3g})")
                else:
                    problems.append(f"{name}: {int(bad.sum())} elements differ by more than 1 fp16 ulp (max {md:.3g})")
            n_ulp = int(((d > EXACT_TOL) & ~bad).sum())
            if n_ulp:
                notes.append(f"{name}:{n_ulp}")
        elif case.kind in LOW_DTYPES:
            if md > EXACT_TOL:
                bad = (d > EXACT_TOL).flatten().nonzero().flatten()
                left = explainer.unexplained(name, bad) if explainer is not None else bad
                if explainer is not None and explainer.rescales and 0 < left.numel() < bad.numel():
                    left = explainer.beyond_rescale_slack(name, left, x, y)
                if left.numel() == 0:
                    tie_explained.append(f"{name} ({len(bad)} el, {md:.3g})")
                else:
                    problems.append(f"{name}: max diff {md:.3g} ({len(left)} of {len(bad)} elements not explained by top-k ties)")
            differ = x.view(-1) != y.view(-1)
            low_stats[0] += int(differ.sum())
            low_stats[1] += d.numel()
            if bool(differ.any()):
                low_stats[2] = max(low_stats[2], max_ulps(x.view(-1)[differ], y.view(-1)[differ]))

    if case.kind == "structural":
        r.max_diff = None
        # extra sanity notes: mean |out - base| per tool (DARE rescale keeps the expected delta magnitude)
        if base is not None:
            def mad(sd: dict[str, torch.Tensor]) -> float:
                num = sum(float((sd[k].double() - base[k].double()).abs().sum()) for k in sd if k in base)
                den = sum(sd[k].numel() for k in sd if k in base)
                return num / den
            notes.append(f"mean|out-base| me {mad(a):.3g} / mk {mad(b):.3g}")
        if rerun is not None:
            again = rerun()
            if again is None:
                problems.append("mergeedit rerun failed")
            else:
                c = load_folder(again)
                if set(c) != set(a) or any(not torch.equal(a[k], c[k]) for k in a):
                    problems.append("mergeedit not reproducible for a fixed --random-seed")
                else:
                    notes.append("rerun identical")
    else:
        r.max_diff = max_diff
        r.worst = worst
        if case.kind == "fp16-out" and notes:
            total = sum(int(n.rsplit(":", 1)[1]) for n in notes)
            notes = [f"{total} elems off by 1 fp16 ulp"]
        if float32_out:
            notes.append("mergekit wrote float32 (a float32 tensor in its formula promotes the result), compared rounded to the dtype")
        if case.kind in LOW_DTYPES:
            if low_stats[0]:
                notes.append(f"{low_stats[0]}/{low_stats[1]} elems not bit-equal, at most {low_stats[2]} ulp (worst {worst})")
            else:
                notes.append(f"bit-identical ({low_stats[1]} elems)")

    r.verdict = "FAIL" if problems else ("TIE" if tie_explained else "PASS")
    if tie_explained:
        notes.insert(0, "top-k tie: " + ", ".join(tie_explained))
    r.note = "; ".join(problems[:3] + ([f"(+{len(problems) - 3} more)"] if len(problems) > 3 else []) + notes)
    return r


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-yaml", help="mergekit-yaml executable")
    default_me = Path(sys.executable).parent / "mergeedit"
    ap.add_argument("--mergeedit", default=str(default_me) if default_me.exists() else (shutil.which("mergeedit") or "mergeedit"))
    ap.add_argument("--keep", action="store_true", help="keep the work dir (printed at the end)")
    ap.add_argument("--work-dir", type=Path, default=None, help="use this dir (implies --keep)")
    ap.add_argument("--only", nargs="*", default=None, help="run only configs whose name contains one of these")
    ap.add_argument("--seed", type=int, default=0, help="--random-seed for both tools")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bf16", "fp16"], choices=["float32", "bf16", "fp16"],
                    help="which variants to run: the configs as written (float32) and/or their bf16/fp16 copies")
    ap.add_argument("--strict-ties", action="store_true",
                    help="count TIE verdicts (differences explained by exact top-k magnitude ties) as failures")
    args = ap.parse_args(argv)
    console = Console(width=200)

    if args.work_dir:
        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
        keep = True
    else:
        work = Path(tempfile.mkdtemp(prefix="mergekit-parity-"))
        keep = args.keep

    try:
        paths: dict[str, dict[str, str]] = {}
        for set_name, shape in (("untied", SHAPE), ("tied", SHAPE_TIED)):
            paths[set_name] = {}
            for key, variant in (("base", None), ("a", 1), ("b", 2), ("c", 3)):
                folder = work / "models" / set_name / key
                if not (folder / "config.json").exists():
                    build_llama(folder, shape, variant=variant, shards=3, dtype=torch.float32)
                paths[set_name][key] = str(folder)

        cases = build_cases()
        if args.only:
            cases = [c for c in cases if any(s in c.name for s in args.only)]
        cases = [c for c in cases if (c.name.rsplit("@", 1)[1] if "@" in c.name else "float32") in args.dtypes]
        results: list[Result] = []
        base_sd = {k: load_folder(Path(p["base"])) for k, p in paths.items()}
        for case in cases:
            cdir = work / "runs" / case.name
            if cdir.exists():
                shutil.rmtree(cdir)
            cdir.mkdir(parents=True)
            cfg_path = cdir / "config.yaml"
            cfg_path.write_text(yaml.safe_dump(resolve(case.config, paths[case.models]), sort_keys=False))
            me_out, mk_out = cdir / "mergeedit", cdir / "mergekit"
            me_cmd = [args.mergeedit, "merge", str(cfg_path), str(me_out), "--random-seed", str(args.seed), "--no-copy-tokenizer"]
            mk_cmd = [args.mergekit, str(cfg_path), str(mk_out), "--no-cuda", "--random-seed", str(args.seed),
                      "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
            console.print(f"[dim]{case.name}: running mergeedit, mergekit ...[/dim]")
            ok_me, t_me, tail_me = run_tool(me_cmd, cdir / "mergeedit.log")
            ok_mk, t_mk, tail_mk = run_tool(mk_cmd, cdir / "mergekit.log")
            if not (ok_me and ok_mk):
                r = Result(case, t_me=t_me, t_mk=t_mk, verdict="ERROR")
                errs = ([f"mergeedit failed: {tail_me}"] if not ok_me else []) + ([f"mergekit failed: {tail_mk}"] if not ok_mk else [])
                r.note = "; ".join(errs)
                results.append(r)
                continue

            def rerun(cdir=cdir, cfg_path=cfg_path) -> Optional[Path]:
                out2 = cdir / "mergeedit-rerun"
                ok, _, _ = run_tool([args.mergeedit, "merge", str(cfg_path), str(out2), "--random-seed", str(args.seed),
                                     "--no-copy-tokenizer"], cdir / "mergeedit-rerun.log")
                return out2 if ok else None

            try:
                r = compare(case, me_out, mk_out, base_sd[case.models], rerun if case.kind == "structural" else None,
                            resolve(case.config, paths[case.models]))
            except Exception as e:  # a broken output folder is a failure, not a crash of the harness
                r = Result(case, verdict="ERROR", note=f"{type(e).__name__}: {e}")
            r.t_me, r.t_mk = t_me, t_mk
            results.append(r)

        table = Table(title=f"mergeedit vs mergekit parity (float32 toy Llama {SHAPE.hidden}h/{SHAPE.layers}L, 3 shards, seed {args.seed})")
        table.add_column("config")
        table.add_column("method")
        table.add_column("check")
        table.add_column("tensors", justify="right")
        table.add_column("max abs diff", justify="right")
        table.add_column("verdict")
        table.add_column("time me/mk (s)", justify="right")
        table.add_column("notes", overflow="fold", max_width=70)
        for r in results:
            style = {"PASS": "green", "TIE": "yellow", "FAIL": "bold red", "ERROR": "bold red"}[r.verdict]
            table.add_row(r.case.name, r.case.method, r.case.kind, str(r.compared),
                          "n/a" if r.max_diff is None else f"{r.max_diff:.3e}",
                          f"[{style}]{r.verdict}[/{style}]", f"{r.t_me:.1f}/{r.t_mk:.1f}", r.note)
        console.print(table)
        failed = [r for r in results if r.verdict in ("FAIL", "ERROR") or (r.verdict == "TIE" and args.strict_ties)]
        ties = sum(r.verdict == "TIE" for r in results)
        summary = f"{len(results) - len(failed)}/{len(results)} configs pass"
        if ties:
            summary += f" ({ties} only through top-k tie-breaking{', counted as failures: --strict-ties' if args.strict_ties else ''})"
        console.print(summary + (f"; logs and outputs under {work}" if keep else ""))
        return 1 if failed else 0
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
