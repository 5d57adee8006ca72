"""Opt-in import of pickled checkpoints (`.bin`, `.pt`): converted once to safetensors, never unpickled unsafely.

A pickle can run code when loaded, so mergeedit refuses pickled weights unless the user passes `--allow-pickle`; even
then each file is loaded with `torch.load(weights_only=True)` (only tensors and plain containers may be rebuilt) and
written as safetensors into a cache folder, one file at a time (peak memory: one pickle file, memory-mapped). The merge
then streams from the converted copy like any safetensors model. The cache is keyed by the files' paths, sizes and
modification times, and written atomically.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..core.environment import cache_root
from ..core.errors import MergeEditError
from ..core.json_shape import SAFETENSORS_INDEX, read_json
from ..core.paths import contained_path, is_regular_file, require_regular
from .output_dir import TOKENIZER_FILES, AtomicOutputDir, copy_files
from .resume import fingerprint

PICKLE_INDEX = "pytorch_model.bin.index.json"
_COPIED = ("config.json", "generation_config.json")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def pickle_files(folder: Path) -> list[Path]:
    """The pickled weight files of a folder, in index order when it has an index."""
    index = folder / PICKLE_INDEX
    if os.path.lexists(index):
        weight_map = read_json(index, SAFETENSORS_INDEX, what="pytorch_model.bin index", fix="re-download the model")["weight_map"]
        first_tensor: dict[str, str] = {}
        for tensor, name in weight_map.items():
            first_tensor.setdefault(name, tensor)
        files = []
        for name, tensor in first_tensor.items():
            f = contained_path(name, folder, source=index, what=f"weight_map entry for '{tensor}'")
            if not os.path.lexists(f):
                raise MergeEditError(f"{index}: lists '{name}', which is missing from {folder}; re-download the model")
            files.append(require_regular(f, "weight file"))
        return files
    return sorted(p for p in folder.iterdir() if is_regular_file(p) and p.suffix in PICKLE_SUFFIXES and not p.name.startswith("optimizer"))


def converted_folder(folder: Path, files: list[Path]) -> Path:
    """Where the safetensors copy of a pickled folder's `files` lives (not necessarily existing yet)."""
    return cache_root() / "from-pickle" / f"{folder.resolve().name}-{fingerprint([], files)[:16]}"


def import_pickled_folder(folder: Path) -> Path:
    """Convert `folder`'s pickled weights to safetensors once (weights_only loads) and return the converted folder."""
    files = pickle_files(folder)
    dest = converted_folder(folder, files)
    if (dest / "model.safetensors").is_file() or (dest / "model.safetensors.index.json").is_file():
        return dest
    with AtomicOutputDir(dest) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for i, f in enumerate(files):
            name = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            tensors = load_weights_only(f)
            for key in tensors:
                if key in weight_map:
                    raise MergeEditError(f"{f}: tensor '{key}' also appears in {weight_map[key]}; the checkpoint is inconsistent")
                weight_map[key] = name
            total += _save(tensors, tmp / name)
            del tensors
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        copy_files(folder, tmp, _COPIED + TOKENIZER_FILES)
    return dest


def load_weights_only(path: Path) -> dict:
    """A flat {name: tensor} from a pickle, refusing anything `weights_only=True` would not rebuild."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch's notes about pickle protocols would bury our one-line verdict
            warnings.simplefilter("ignore")
            obj = _torch_load(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise MergeEditError(
            f"{path}: refused by torch.load(weights_only=True): {refusal_reason(exc)}; mergeedit loads pickles only that way "
            "and did not load this file otherwise; convert it to safetensors with a tool you trust"
        ) from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model", "module") and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise MergeEditError(f"{path}: does not hold a flat dict of named tensors (a state dict); re-save it with torch.save(model.state_dict())")
    return obj


def refusal_reason(exc: BaseException) -> str:
    """What torch.load(weights_only=True) objected to, without torch's advice to re-run it with weights_only=False
    (which mergeedit never does, and which would read as if it had)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:
        reason = found.group(1).strip().splitlines()[0]
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln and "Re-running" not in ln]
        reason = lines[0] if lines else exc.__class__.__name__
    reason = re.sub(r"\s*Please file an issue.*$", "", reason)
    reason = re.split(r"\bCheck the documentation of torch\.load\b", reason)[0].strip()
    return f"the file holds {reason[:200].rstrip('. ')}, which a weights-only load does not rebuild" if found else f"not a weights-only checkpoint ({reason[:200]})"


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format cannot be mapped


def _save(tensors: dict, path: Path) -> int:
    """Write with safetensors; tensors sharing storage (tied weights) are copied apart, as safetensors requires."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        v = v.contiguous()
        if key in seen or not v.is_contiguous() or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()
        seen.add(key)
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt"})
    return sum(v.numel() * v.element_size() for v in out.values())
