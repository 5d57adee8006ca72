"""`mergeedit merge CONFIG OUT --ray [--workers N]`: the N parts of a partitioned merge as Ray tasks, then assembled.

Ray schedules; mergeedit only deals out the shards (merging.partition). Each task runs `write_part` for its part on
whichever node Ray gives it, so OUT's parent must be on a file system every node sees (as for --part under SLURM).
`ray.init()` connects to the cluster named by RAY_ADDRESS (or one started on this machine with `ray start`), else
starts a local one. Per-part progress (bytes of tensors written) flows back through a small Ray actor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from ..core.environment import fault_injection
from ..core.errors import MergeEditError
from ..merging.merge import MergeOptions, check_merge_location, load_plan
from ..merging.partition import AssembleReport, PartReport, assemble, plan_part, write_part

PartProgress = Callable[[int, int, int, int, str], None]  # (part, of, bytes done, bytes of the part, state)


@dataclass
class RayReport:
    of: int
    part_seconds: float  # from submitting the tasks to the last part finishing
    parts: list[PartReport]
    assemble: AssembleReport


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MergeEditError(
            "--ray needs Ray, which is not installed: pip install 'mergeedit[ray]' "
            "(or run the parts yourself: --part I/N for I = 1..N, then --assemble)"
        ) from None
    return ray


def _part_task(config: str, out_dir: str, options: MergeOptions, part: int, of: int, tracker) -> PartReport:
    """One part, inside a Ray worker process: plan from the config (headers only), then write the part's shards. The
    tests' fault injection is the worker process's own (its environment), not the driver's."""
    options = replace(options, fault_injection=fault_injection())
    plan = load_plan(Path(config), options)
    return write_part(plan, Path(out_dir), options, part, of, progress=lambda t, nbytes: tracker.add.remote(part, nbytes))


class _Tracker:
    """A Ray actor counting the bytes each part has written (tasks report after every tensor)."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def add(self, part: int, nbytes: int) -> None:
        self.done[part] = self.done.get(part, 0) + nbytes

    def snapshot(self) -> dict[int, int]:
        return dict(self.done)


def _cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, unwrapped from Ray's RayTaskError."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def run_on_ray(
    config: Path, out_dir: Path, options: MergeOptions, workers: Optional[int] = None, on_part: Optional[PartProgress] = None,
    cpus_per_part: float = 1,
) -> RayReport:
    """Run every part as a Ray task (`workers` of them; default: the cluster's CPUs, at most one per shard), show
    progress through `on_part`, then assemble OUT on this machine."""
    import time

    ray = _import_ray()
    if workers is not None and workers < 1:
        raise MergeEditError(f"--workers {workers}: needs at least 1 worker")
    plan = load_plan(Path(config), options)
    check_merge_location(plan, Path(out_dir), options)  # here, before any task: an OUT that is taken fails once, not N times
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    shard_count = len(plan_part(plan, options, 1, 1).shards)
    of = workers or max(1, min(shard_count, int(ray.cluster_resources().get("CPU", 1) // max(cpus_per_part, 1e-9))))
    layouts = {i: plan_part(plan, options, i, of) for i in range(1, of + 1)}
    remote = ray.remote(num_cpus=cpus_per_part, max_retries=0)(_part_task)
    tracker = ray.remote(num_cpus=0)(_Tracker).remote()
    started = time.perf_counter()
    config_s, out_s = str(Path(config).absolute()), str(Path(out_dir).absolute())
    pending = {remote.remote(config_s, out_s, options, i, of, tracker): i for i in layouts}
    reports: dict[int, PartReport] = {}
    states = {i: "queued" for i in layouts}

    def show() -> None:
        if on_part is None:
            return
        done = ray.get(tracker.snapshot.remote())
        for i, layout in layouts.items():
            if states[i] == "queued" and done.get(i):
                states[i] = "running"
            on_part(i, of, layout.nbytes if i in reports else done.get(i, 0), layout.nbytes, states[i])

    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    reports[i] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - reworded below, the task's own error first
                    cause = _cause(exc)
                    for other in pending:
                        ray.cancel(other)
                    message = str(cause) if isinstance(cause, MergeEditError) else f"{type(cause).__name__}: {cause}"
                    raise MergeEditError(
                        f"part {i}/{of} failed on the Ray cluster: {message} (finished parts are kept: run again with --resume)"
                    ) from None
                states[i] = "done" + (f", {reports[i].resumed_shards} shard(s) reused" if reports[i].resumed_shards else "")
            show()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        raise
    part_seconds = time.perf_counter() - started
    return RayReport(of, part_seconds, [reports[i] for i in sorted(reports)], assemble(plan, Path(out_dir), options))
