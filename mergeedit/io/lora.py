"""PEFT LoRA adapters folded into their base weights on load: W' = W + scale * B @ A, one tensor (or row range) at a time.

mergekit folds `model+adapter` references by loading both with peft and writing a merged copy; we read the adapter's
safetensors directly and apply the update while streaming, so nothing is copied and no pickle is ever loaded.

The arithmetic follows peft's LoraLayer.merge (W + scale * B @ A, rounded once to the weight's stored dtype; scale is
lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA), but the product is not a BLAS matmul: a matmul's low bits depend on
how many rows it is given and on the CPU's kernels (MKL's AVX2 kernels gave different bits for a few rows of B @ A than
for the whole product), so a fold done per row chunk would make the bytes depend on the memory budget. Each element is
instead the float64 sum, in the fixed order k = 0 .. r-1, of B[i, k] * A[k, j] (each product of two float32 values is
exact in float64), times scale, plus W[i, j], all in float64 and rounded once: elementwise IEEE operations only, so an
element's bits depend on nothing but its own inputs, whatever the rows, the threads or the processor.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.errors import MergeEditError
from ..core.json_shape import ADAPTER_CONFIG as ADAPTER_CONFIG_SHAPE
from ..core.json_shape import read_json
from ..core.paths import require_regular
from .safetensors_header import TensorInfo, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LowRankUpdate:
    """The adapter matrices for one base weight: A is (r, in), B is (out, r); W is (out, in), or (in, out) if fan_in_fan_out."""

    a: TensorInfo
    b: TensorInfo
    scale: float
    fan_in_fan_out: bool = False

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes

    def delta_rows(self, read: Callable[..., torch.Tensor], rows: Optional[tuple[int, int]]) -> torch.Tensor:
        """scale * (B @ A) for rows [a, b) of W (all rows when None), in float64, split-invariant (see the module
        docstring). `read(info, rows)` is the reader's: only the rows of B that W's rows need are read (with
        fan_in_fan_out, W's rows are columns of A, so A is sliced)."""
        if self.fan_in_fan_out:  # W stores the transpose: its rows are input features, i.e. columns of A
            a, b = read(self.a, None), read(self.b, None)
            a = a if rows is None else a[:, rows[0] : rows[1]]
            return low_rank_product(a.t(), b.t(), self.scale)  # (B @ A).t() = A.t() @ B.t()
        return low_rank_product(read(self.b, rows), read(self.a, None), self.scale)

    @staticmethod
    def fold_into(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """weight += delta, added in float64 and rounded once to the weight's dtype; in place."""
        return weight.copy_(delta.add_(weight.to(torch.float64)))


FOLD_BLOCK = 1 << 16  # float64 elements of the product computed at a time (512 KiB: the r passes stay in cache)


def low_rank_product(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (left @ right) in float64 as elementwise operations in a fixed order: out[i, j] = (sum over k = 0 .. r-1,
    in that order, of left[i, k] * right[k, j]) * scale. No BLAS: every element's bits depend only on its own inputs
    (not on how many rows are computed together, the thread count or the CPU), so row chunks give the bytes of the
    whole. Computed a few rows at a time so the r accumulation passes run in cache."""
    left, right = left.to(torch.float64), right.to(torch.float64)
    rows, r = left.shape
    cols = right.shape[1]
    out = torch.empty(rows, cols, dtype=torch.float64)
    if r == 0 or rows == 0:
        return out.zero_()
    step = max(1, FOLD_BLOCK // max(cols, 1))
    term = torch.empty(min(step, rows), cols, dtype=torch.float64)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        acc, tmp = out[a:b], term[: b - a]
        torch.mul(left[a:b, 0:1], right[0:1], out=acc)
        for k in range(1, r):
            acc.add_(torch.mul(left[a:b, k : k + 1], right[k : k + 1], out=tmp))
        acc.mul_(scale)
    return out


def split_lora_ref(ref: str) -> tuple[str, Optional[str]]:
    """`model+adapter` -> (`model`, `adapter`); a plain reference -> (ref, None). Each part may carry its own @revision."""
    parts = ref.split("+")
    if len(parts) == 1:
        return ref, None
    if len(parts) != 2 or not all(parts):
        raise MergeEditError(f"model '{ref}': expected 'model+adapter' with exactly one '+'; rename paths that contain '+'")
    return parts[0], parts[1]


def _adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not os.path.lexists(path):
        raise MergeEditError(f"{folder}: no {ADAPTER_CONFIG}; a LoRA reference 'model+adapter' needs a PEFT adapter folder")
    cfg = read_json(path, ADAPTER_CONFIG_SHAPE, what="PEFT adapter config", fix="fix or re-save the adapter")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise MergeEditError(f"{path}: peft_type '{kind}' is not supported; only LoRA adapters can be folded")
    if cfg.get("use_dora"):
        raise MergeEditError(f"{path}: DoRA adapters (use_dora: true) are not supported; merge it with peft first")
    if cfg.get("modules_to_save"):
        raise MergeEditError(f"{path}: modules_to_save {cfg['modules_to_save']} is not supported; merge it with peft first")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in pattern.values()):
            raise MergeEditError(f"{path}: '{key}' must map module patterns to positive numbers, got {pattern!r}")
        for k in pattern:
            try:
                re.compile(k)
            except re.error as exc:
                raise MergeEditError(f"{path}: {key} key {k!r} is not a valid regular expression ({exc})") from None
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise MergeEditError(f"{path}: '{key}' must be a positive number, got {cfg.get(key)!r}")
    return cfg


def _weights_file(folder: Path) -> Path:
    path = folder / ADAPTER_WEIGHTS
    if os.path.lexists(path):
        return require_regular(path, "adapter weights")
    if (folder / "adapter_model.bin").is_file():
        raise MergeEditError(
            f"{folder}: holds only adapter_model.bin (pickle, which can run code when loaded); convert it to {ADAPTER_WEIGHTS}"
        )
    raise MergeEditError(f"{folder}: no {ADAPTER_WEIGHTS}; point '+' at a PEFT LoRA adapter folder")


def pattern_value(pattern: dict, module: str, default: float) -> float:
    """A rank_pattern / alpha_pattern entry for `module`, as peft picks it: the first key K (in file order) for which
    `(.*\\.)?(K)$` matches the module's name; `default` when none does."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _target_name(key: str, part: str) -> str:
    """`base_model.model.X.lora_A[.adapter].weight` -> `X.weight`."""
    module = key.removeprefix(_PEFT_PREFIX).split(f".{part}", 1)[0]
    return f"{module}.weight"


def load_adapter(folder: Path, base_tensors: dict[str, TensorInfo]) -> dict[str, LowRankUpdate]:
    """The low-rank update for every base weight the adapter targets, checked against the base's tensor shapes."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MergeEditError(f"adapter '{folder}': no such folder; give 'model+path/to/adapter'")
    cfg = _adapter_config(folder)
    weights = _weights_file(folder)
    tensors, _ = read_header(weights)
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        if "lora_embedding_" in key:
            raise MergeEditError(f"{weights}: tensor '{key}' is an embedding LoRA, which is not supported; merge it with peft first")
        part = "lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else None
        if part is None:
            raise MergeEditError(f"{weights}: tensor '{key}' is not a lora_A/lora_B weight (bias or saved module); merge it with peft first")
        pairs.setdefault(_target_name(key, part), {})[part] = info
    alpha_pattern = cfg.get("alpha_pattern") or {}
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    updates: dict[str, LowRankUpdate] = {}
    for name, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise MergeEditError(f"{weights}: '{name}' has only {', '.join(pair)}; the adapter file is incomplete")
        a, b = pair["lora_A"], pair["lora_B"]
        base = base_tensors.get(name)
        if base is None:
            raise MergeEditError(f"{weights}: targets '{name}', which the base model does not have; the adapter belongs to another model")
        r = a.shape[0]
        out_in = (base.shape[1], base.shape[0]) if fan_in_fan_out else tuple(base.shape)
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != out_in:
            raise MergeEditError(
                f"{weights}: '{name}' lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the base weight {list(base.shape)}"
                + ("" if fan_in_fan_out else "; if the base stores (in, out) weights set fan_in_fan_out: true")
            )
        alpha = float(pattern_value(alpha_pattern, name.removesuffix(".weight"), cfg["lora_alpha"]))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        updates[name] = LowRankUpdate(a, b, scale, fan_in_fan_out)
    return updates
