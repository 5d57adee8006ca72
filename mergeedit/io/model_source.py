"""A model as the merge sees it: a name, a tensor index built from headers alone, and its config.

Accepted: a Hugging Face folder (model.safetensors, or shards listed in model.safetensors.index.json), a single
.safetensors file, or a hub id (`org/name`, `org/name@revision`) resolved through the Hugging Face cache.
`model+adapter` adds a local PEFT LoRA adapter, folded into the weights as they are read (io/lora.py).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..core.errors import MergeEditError
from ..core.json_shape import MODEL_CONFIG, SAFETENSORS_INDEX, read_json
from ..core.paths import contained_path, is_regular_file, kind_of, require_regular
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
    if not os.path.lexists(cfg):
        return None
    return read_json(cfg, MODEL_CONFIG, what="model config.json", fix="fix or re-download the file")


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file), shape-checked."""
    return read_json(index, SAFETENSORS_INDEX, what="safetensors index", fix="re-export or re-download the model")["weight_map"]


def _regular_shards(folder: Path, files: list[Path]) -> list[Path]:
    for f in files:
        require_regular(f, "weight file")
    return files


def _folder_files(folder: Path, root: Path | None = None) -> list[Path]:
    index = folder / INDEX_NAME
    if os.path.lexists(index):
        weight_map = _read_index(index)
        first_tensor: dict[str, str] = {}
        for tensor, name in weight_map.items():
            first_tensor.setdefault(name, tensor)
        paths = []
        for name, tensor in first_tensor.items():
            f = contained_path(name, folder, source=index, what=f"weight_map entry for '{tensor}'", root=root)
            if not os.path.lexists(f):
                raise MergeEditError(f"{index}: lists shard '{name}', which is missing from {folder}; re-download the model")
            paths.append(require_regular(f, "weight file"))
        return paths
    if os.path.lexists(folder / SINGLE_NAME):
        return _regular_shards(folder, [folder / SINGLE_NAME])
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return _regular_shards(folder, shards)
    pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise MergeEditError(
            f"{folder}: holds only pickled weights ({pickled[0]}), which can run code when loaded; "
            "convert the model to safetensors, or pass --allow-pickle to import it with torch.load(weights_only=True)"
        )
    raise MergeEditError(f"{folder}: no .safetensors weights found; point to a Hugging Face model folder or a .safetensors file")


def _is_pickle_only(folder: Path) -> bool:
    return not any(folder.glob("*.safetensors")) and any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir())


def open_local(ref: str, path: Path, allow_pickle: bool = False, root: Path | None = None) -> ModelSource:
    """Index a local folder or .safetensors file from its headers (a pickled folder only with `allow_pickle`).

    Shards an index names must lie inside the folder (`root`, when given: a hub cache repo whose snapshot links into
    its blobs), after resolving symlinks; only regular files are read."""
    path = Path(path)
    if not path.is_dir() and not is_regular_file(path):
        raise MergeEditError(f"{path}: the model is {kind_of(path)}; expected a model folder or a .safetensors file")
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
        files = _folder_files(folder, root)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        found, _ = read_header(f)
        for name, info in found.items():
            if name in tensors:
                raise MergeEditError(f"{folder}: tensor '{name}' appears in both {tensors[name].path.name} and {f.name}; the checkpoint is inconsistent")
            tensors[name] = info
    index = folder / INDEX_NAME
    if path.is_dir() and os.path.lexists(index):
        weight_map = _read_index(index)
        missing = set(weight_map) - set(tensors)
        if missing:
            raise MergeEditError(f"{index}: lists tensor '{sorted(missing)[0]}' that no shard holds; re-download the model")
        misplaced = next((n for n, f in weight_map.items() if tensors[n].path.name != PurePosixPath(f).name), None)
        if misplaced is not None:
            raise MergeEditError(f"{index}: says tensor '{misplaced}' is in '{weight_map[misplaced]}' but it is in {tensors[misplaced].path.name}; re-export the model")
    return ModelSource(ref=ref, path=path, tensors=tensors, config=_load_config(folder), files=files)


def open_model(ref: str, *, allow_download: bool = True, allow_pickle: bool = False) -> ModelSource:
    """Resolve a model reference (local path or hub id) and index its tensors."""
    if "+" in ref and not Path(ref).expanduser().exists():
        return _open_with_adapter(ref, allow_download=allow_download, allow_pickle=allow_pickle)
    name, revision = split_revision(ref)
    path = Path(name).expanduser()
    if path.exists():
        return open_local(ref, path, allow_pickle=allow_pickle)
    if os.path.lexists(path) or _ends_in_a_loop(path):
        raise MergeEditError(f"model '{ref}': {path} is {kind_of(path)}; fix the link or give the model's real folder")
    if HUB_ID.match(name) and not name.startswith((".", "/")):
        from .hub import resolve_hub_model

        snapshot = resolve_hub_model(name, revision, allow_download=allow_download)
        return open_local(ref, snapshot, root=snapshot.parent.parent if snapshot.parent.name == "snapshots" else None)
    raise MergeEditError(f"model '{ref}': no such file or folder, and not a hub id (org/name); check the path")


def _ends_in_a_loop(path: Path) -> bool:
    """Whether some part of `path` is a symlink loop (os.stat says ELOOP), which exists() reports as plain absence."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


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
