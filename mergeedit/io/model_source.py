"""A model as the merge sees it: a name, a tensor index built from headers alone, and its config.

Accepted: a Hugging Face folder (model.safetensors, or shards listed in model.safetensors.index.json), a single
.safetensors file, or a hub id (`org/name`, `org/name@revision`) resolved through the Hugging Face cache.
`model+adapter` adds a local PEFT LoRA adapter, folded into the weights as they are read (io/lora.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import MergeEditError
from .lora import LowRankUpdate, load_adapter, split_lora_ref
from .pickle_import import PICKLE_SUFFIXES, import_pickled_folder
from .safetensors_header import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class ModelSource:
    """What we know about one input model without reading any tensor data."""

    ref: str  # as written by the user
    path: Path  # folder (or the single file)
    tensors: dict[str, TensorInfo]
    config: dict | None = None
    files: list[Path] = field(default_factory=list)
    lora: dict[str, LowRankUpdate] = field(default_factory=dict)  # base tensor name -> adapter update folded on load

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def split_revision(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`); a local path containing '@' is left alone."""
    if "@" in ref and not Path(ref).exists():
        name, _, rev = ref.rpartition("@")
        return name, rev or None
    return ref, None


def _load_config(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        raise MergeEditError(f"{cfg}: cannot parse config.json ({exc}); fix or remove the file") from None


def _folder_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MergeEditError(f"{index}: not a valid safetensors index ({exc.__class__.__name__}: {exc}); re-export the model") from None
        files = []
        for name in dict.fromkeys(weight_map.values()):
            f = folder / name
            if not f.is_file():
                raise MergeEditError(f"{index}: lists shard '{name}', which is missing from {folder}; re-download the model")
            files.append(f)
        return files
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise MergeEditError(
            f"{folder}: holds only pickled weights ({pickled[0]}), which can run code when loaded; "
            "convert the model to safetensors, or pass --allow-pickle to import it with torch.load(weights_only=True)"
        )
    raise MergeEditError(f"{folder}: no .safetensors weights found; point to a Hugging Face model folder or a .safetensors file")


def _is_pickle_only(folder: Path) -> bool:
    return not any(folder.glob("*.safetensors")) and any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir())


def open_local(ref: str, path: Path, allow_pickle: bool = False) -> ModelSource:
    """Index a local folder or .safetensors file from its headers (a pickled folder only with `allow_pickle`)."""
    if path.is_file():
        if path.suffix != ".safetensors":
            hint = " (pickled weights: point to their folder and pass --allow-pickle)" if path.suffix in PICKLE_SUFFIXES else ""
            raise MergeEditError(f"{path}: expected a .safetensors file or a model folder{hint}")
        files = [path]
        folder = path.parent
    else:
        if allow_pickle and path.is_dir() and _is_pickle_only(path):
            path = import_pickled_folder(path)
        folder = path
        files = _folder_files(folder)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        found, _ = read_header(f)
        for name, info in found.items():
            if name in tensors:
                raise MergeEditError(f"{folder}: tensor '{name}' appears in both {tensors[name].path.name} and {f.name}; the checkpoint is inconsistent")
            tensors[name] = info
    index = folder / INDEX_NAME
    if path.is_dir() and index.is_file():
        missing = set(json.loads(index.read_text())["weight_map"]) - set(tensors)
        if missing:
            raise MergeEditError(f"{index}: lists tensor '{sorted(missing)[0]}' that no shard holds; re-download the model")
    return ModelSource(ref=ref, path=path, tensors=tensors, config=_load_config(folder), files=files)


def open_model(ref: str, *, allow_download: bool = True, allow_pickle: bool = False) -> ModelSource:
    """Resolve a model reference (local path or hub id) and index its tensors."""
    if "+" in ref and not Path(ref).expanduser().exists():
        return _open_with_adapter(ref, allow_download=allow_download, allow_pickle=allow_pickle)
    name, revision = split_revision(ref)
    path = Path(name).expanduser()
    if path.exists():
        return open_local(ref, path, allow_pickle=allow_pickle)
    if HUB_ID.match(name) and not name.startswith((".", "/")):
        from .hub import resolve_hub_model

        return open_local(ref, resolve_hub_model(name, revision, allow_download=allow_download))
    raise MergeEditError(f"model '{ref}': no such file or folder, and not a hub id (org/name); check the path")


def _open_with_adapter(ref: str, *, allow_download: bool, allow_pickle: bool) -> ModelSource:
    """`model+adapter`: the model's tensors, with the adapter's low-rank updates to fold in as they are read."""
    model_ref, adapter_ref = split_lora_ref(ref)
    model = open_model(model_ref, allow_download=allow_download, allow_pickle=allow_pickle)
    adapter_name, revision = split_revision(adapter_ref)
    if revision is not None or not Path(adapter_name).expanduser().is_dir():
        raise MergeEditError(f"model '{ref}': adapter '{adapter_ref}' is not a local folder; download the PEFT adapter and give its path")
    model.ref = ref
    model.lora = load_adapter(Path(adapter_name).expanduser(), model.tensors)
    return model


def overlay(base: ModelSource, delta: ModelSource, ref: str) -> ModelSource:
    """`base` with some tensors replaced by those of `delta` (an R-SFT delta): no full copy is ever written."""
    unknown = [n for n in delta.tensors if n not in base.tensors]
    if unknown:
        raise MergeEditError(f"{delta.path}: tensor '{unknown[0]}' is not in the base model {base.ref}; the delta belongs to another model")
    return ModelSource(ref=ref, path=base.path, tensors={**base.tensors, **delta.tensors}, config=base.config, files=base.files + delta.files)
