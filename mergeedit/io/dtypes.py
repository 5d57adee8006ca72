"""The safetensors dtype names and the torch dtypes they map to."""

from __future__ import annotations

import torch

from ..core.errors import MergeEditError


def _optional(name: str) -> torch.dtype | None:
    return getattr(torch, name, None)


_CANDIDATES: dict[str, torch.dtype | None] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": _optional("uint16"),
    "I32": torch.int32,
    "U32": _optional("uint32"),
    "I64": torch.int64,
    "U64": _optional("uint64"),
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": _optional("float8_e4m3fn"),
    "F8_E5M2": _optional("float8_e5m2"),
    "F8_E4M3FNUZ": _optional("float8_e4m3fnuz"),
    "F8_E5M2FNUZ": _optional("float8_e5m2fnuz"),
    "F8_E8M0": _optional("float8_e8m0fnu"),
}

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {k: v for k, v in _CANDIDATES.items() if v is not None}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

# Names users write in configs (mergekit's and torch's spellings).
_USER_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_user_dtype(name: str, where: str) -> torch.dtype:
    """A compute or output dtype named in a config or on the command line."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _USER_NAMES:
        raise MergeEditError(f"{where}: unknown dtype '{name}'; use one of float32, bfloat16, float16, float64")
    return _USER_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The name transformers writes in config.json ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


def compute_dtype_for(dtypes: set[torch.dtype]) -> torch.dtype:
    """Arithmetic precision when the config names none: float64 stays float64, every other float type computes in float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
