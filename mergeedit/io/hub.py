"""Hub ids resolve through the Hugging Face cache; only the files a merge needs are fetched.

huggingface_hub is imported here, lazily, so local merges never pay for it.
"""

from __future__ import annotations

from pathlib import Path

from ..core.environment import hub_offline
from ..core.errors import MergeEditError

NEEDED_FILES = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.*",
]


def resolve_hub_model(repo_id: str, revision: str | None, *, allow_download: bool = True) -> Path:
    """Path of the cached snapshot of `repo_id`, downloading the needed files when online and allowed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise MergeEditError(f"model '{repo_id}': looks like a hub id but huggingface_hub is not installed; pip install huggingface_hub") from None
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=NEEDED_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss falls through to the download attempt
        pass
    if hub_offline() or not allow_download:
        raise MergeEditError(
            f"model '{where}': not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE); "
            f"download it first (huggingface-cli download {repo_id}) or give a local folder"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=NEEDED_FILES))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; all mean "could not get it"
        raise MergeEditError(
            f"model '{where}': not in the Hugging Face cache and the hub could not be reached ({exc.__class__.__name__}); "
            "check the id and your network, or give a local folder"
        ) from None
