"""Reading a merge config: the YAML, its schema, and mergekit's `modules:` layout rewritten as `models`/`slices`.

The one way a config document becomes the `MergeConfig` the planner reads, for single merges and for each document of
a merge graph alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..core.yaml_source import YamlDocument, load_yaml
from .modules_layout import flatten_modules
from .schema import MergeConfig, parse_merge_config


def locate_model(ref: str, config_path: Path) -> Optional[Path]:
    """Where a model reference points on disk: from the working directory, then from the config's folder; None when
    neither exists (a hub id, or a name a merge graph defines)."""
    for candidate in (Path(ref).expanduser(), Path(config_path).parent / ref):
        if candidate.exists():
            return candidate
    return None


def config_from_document(doc: YamlDocument) -> tuple[MergeConfig, YamlDocument]:
    """The config of one YAML document, and the document that locates its keys (module lines for `modules:`)."""
    return flatten_modules(parse_merge_config(doc), doc)


def load_merge_config(path: Path | str) -> tuple[MergeConfig, YamlDocument]:
    """The config with a `modules:` layout already rewritten as the `models`/`slices` one the planner reads."""
    return config_from_document(load_yaml(path, "merge config"))
