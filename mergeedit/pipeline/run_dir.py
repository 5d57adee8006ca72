"""A run directory of cached stages: a stage is redone only when its inputs or settings change, or when forced.

Each stage's folder is written atomically and holds `stage.json` with the hash of everything it was computed from and
an output id. Later stages hash their upstream stages' output ids, so redoing a stage redoes everything after it.

`RunDir.produce` is the one rule every stage follows: reuse it when it is done; otherwise compute (on every process,
for work such as the R-SFT steps that all of them share), write on the main process into a temporary sibling that
becomes the stage's folder only when complete, and let the other processes go on once it is there. The run directory
records which stages ran and which were reused, in order.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

from ..core.memory import release_free_memory
from ..io.integrity import write_errors_named
from ..io.output_dir import AtomicOutputDir

STAGE_FILE = "stage.json"
RESULT_FILE = "result.json"



def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stage_peak_rss() -> int:
    """Peak RSS since the last `reset_peak_rss` (VmHWM), in bytes; the process's lifetime peak where unsupported."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    from ..core.memory import peak_rss

    return peak_rss()

class StageReporter(Protocol):
    def stage(self, name: str, cached: bool, detail: str = "") -> None: ...


class _Quiet:
    def stage(self, name: str, cached: bool, detail: str = "") -> None:
        pass


class _SingleProcess:
    is_main = True
    collective = None

    @contextmanager
    def main_first(self) -> Iterator[bool]:
        yield True

    def barrier(self) -> None:
        pass


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
        with write_errors_named(self.path, f"stage {self.name}"), AtomicOutputDir(self.path) as tmp:
            yield tmp
            (tmp / STAGE_FILE).write_text(json.dumps({"stage": self.name, "key": self.key, "output_id": uuid.uuid4().hex}, indent=2))


class RunDir:
    def __init__(self, root: Path, force: list[str] | None = None, reporter: Optional[StageReporter] = None, dist=None) -> None:
        self.root = Path(root)  # created with the first stage written (AtomicOutputDir makes the parents)
        self.force = list(force or [])
        self.order: list[str] = []
        self.reporter = reporter or _Quiet()
        self.dist = dist or _SingleProcess()  # anything with `is_main`, `main_first()` and `barrier()` (pipeline.distributed)
        self.ran: list[str] = []
        self.profile: dict[str, dict] = {}  # stage run here -> {"seconds", "peak_rss" (bytes, this stage's own peak)}
        self.reused: list[str] = []

    def stage(self, name: str, inputs: Any) -> Stage:
        """`--force rsft` redoes every stage named rsft or rsft-*; stages that depend on it follow by their keys."""
        forced = any(name == f or name.startswith(f + "-") for f in self.force)
        self.order.append(name)
        return Stage(name, self.root / "stages" / name, stable_hash({"stage": name, "inputs": inputs}), forced)

    def produce(
        self,
        name: str,
        inputs: Any,
        write: Callable[..., None],
        *,
        compute: Optional[Callable[[], Any]] = None,
        detail: str = "",
    ) -> Stage:
        """The stage `name` for `inputs`, made if it is not done: `compute()` runs on every process (its value is
        passed on), then `write(tmp[, value])` fills the stage's temporary folder on the main process."""
        stage = self.stage(name, inputs)
        done = stage.done
        # every process reads `done` before any passes this barrier, so before the main process can write the stage:
        # all of them take the same branch (a process that saw the main process's finished stage would skip the
        # barrier inside main_first and pair the next stage's barrier with this one's)
        self.dist.barrier()
        if done:
            self.reporter.stage(name, True)
            self.reused.append(name)
            return stage
        self.reporter.stage(name, False, detail)
        release_free_memory()  # what earlier stages freed leaves the resident set, so this stage's peak is its own
        started, _ = time.perf_counter(), reset_peak_rss()
        value = compute() if compute is not None else None
        with self.dist.main_first() as main:
            if main:
                with stage.writing() as tmp:
                    write(tmp, value) if compute is not None else write(tmp)
        self.ran.append(name)
        self.profile[name] = {"seconds": time.perf_counter() - started, "peak_rss": stage_peak_rss()}
        return stage

    def produce_json(self, name: str, inputs: Any, compute: Callable[[], dict], detail: str = "", shared: bool = False) -> tuple[Stage, dict]:
        """A stage whose output is one JSON document, computed on the main process only; with `shared` (an evaluation)
        on every process, each running its share of the batched passes (evaluation.metrics.shared), so several
        processes score a model in about 1/N of the time and get what one process gets."""

        def write(tmp: Path, value: dict) -> None:
            (tmp / RESULT_FILE).write_text(json.dumps(value, indent=2))

        if shared:
            from ..evaluation.metrics import shared as sharing

            def on_every_process() -> dict:
                with sharing(self.dist.collective):
                    return compute()

            stage = self.produce(name, inputs, write, compute=on_every_process, detail=detail)
        else:
            stage = self.produce(name, inputs, lambda tmp: write(tmp, compute()), detail=detail)
        return stage, json.loads((stage.path / RESULT_FILE).read_text())

    def output_id(self, name: str) -> Optional[str]:
        """The output id of a finished stage, or None when it was never made."""
        meta = self.root / "stages" / name / STAGE_FILE
        return json.loads(meta.read_text())["output_id"] if meta.is_file() else None

    def discard(self, name: str) -> None:
        """Remove a scratch stage (the sweep's per-point merge): its output is not kept."""
        import shutil

        if self.dist.is_main:
            shutil.rmtree(self.root / "stages" / name, ignore_errors=True)
