"""A model as the merge sees it: a name, a tensor index built from headers alone, and its config.

Accepted: a Hugging Face folder (model.safetensors, or shards listed in model.safetensors.index.json), a single
.safetensors file, or a hub id (`org/name`, `org/name@revision`) resolved through the Hugging Face cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MergeEditError
from .safetensors_header import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class ModelSource:
    """What we know about one input model without reading any tensor data."""

    ref: str  # as written by the user
    path: Path  # folder (or the single file)
    tensors: dict[str, TensorInfo]
    config: dict | None = None
    files: list[Path] = field(default_factory=list)

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
    pickled = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickled:
        raise MergeEditError(
            f"{folder}: holds only pickled weights ({pickled[0]}), which can run code when loaded; "
            "convert the model to safetensors first"
        )
    raise MergeEditError(f"{folder}: no .safetensors weights found; point to a Hugging Face model folder or a .safetensors file")


def open_local(ref: str, path: Path) -> ModelSource:
    """Index a local folder or .safetensors file from its headers."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise MergeEditError(f"{path}: expected a .safetensors file or a model folder")
        files = [path]
        folder = path.parent
    else:
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


def open_model(ref: str, *, allow_download: bool = True) -> ModelSource:
    """Resolve a model reference (local path or hub id) and index its tensors."""
    if "+" in ref and not Path(ref).exists():
        raise MergeEditError(f"model '{ref}': LoRA references (model+adapter) are not supported yet; merge the adapter into the model first")
    name, revision = split_revision(ref)
    path = Path(name).expanduser()
    if path.exists():
        return open_local(ref, path)
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        from .hub import resolve_hub_model

        return open_local(ref, resolve_hub_model(name, revision, allow_download=allow_download))
    raise MergeEditError(f"model '{ref}': no such file or folder, and not a hub id (org/name); check the path")


def overlay(base: ModelSource, delta: ModelSource, ref: str) -> ModelSource:
    """`base` with some tensors replaced by those of `delta` (an R-SFT delta): no full copy is ever written."""
    unknown = [n for n in delta.tensors if n not in base.tensors]
    if unknown:
        raise MergeEditError(f"{delta.path}: tensor '{unknown[0]}' is not in the base model {base.ref}; the delta belongs to another model")
    return ModelSource(ref=ref, path=base.path, tensors={**base.tensors, **delta.tensors}, config=base.config, files=base.files + delta.files)
