"""A run directory of cached stages: a stage is redone only when its inputs or settings change, or when forced.

Each stage's folder is written atomically and holds `stage.json` with the hash of everything it was computed from and
an output id. Later stages hash their upstream stages' output ids, so redoing a stage redoes everything after it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..io.output_dir import AtomicOutputDir

STAGE_FILE = "stage.json"


def stable_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    path: Path
    key: str
    forced: bool

    @property
    def done(self) -> bool:
        meta = self.path / STAGE_FILE
        if self.forced or not meta.is_file():
            return False
        try:
            return json.loads(meta.read_text()).get("key") == self.key
        except ValueError:
            return False

    @property
    def output_id(self) -> str:
        return json.loads((self.path / STAGE_FILE).read_text())["output_id"]

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """A temporary folder that becomes the stage's folder (with its stage.json) only if the block completes."""
        with AtomicOutputDir(self.path) as tmp:
            yield tmp
            (tmp / STAGE_FILE).write_text(json.dumps({"stage": self.name, "key": self.key, "output_id": uuid.uuid4().hex}, indent=2))


class RunDir:
    def __init__(self, root: Path, force: list[str] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.force = list(force or [])
        self.order: list[str] = []

    def stage(self, name: str, inputs: Any) -> Stage:
        """`--force rsft` redoes every stage named rsft or rsft-*; stages that depend on it follow by their keys."""
        forced = any(name == f or name.startswith(f + "-") for f in self.force)
        self.order.append(name)
        return Stage(name, self.root / "stages" / name, stable_hash({"stage": name, "inputs": inputs}), forced)
