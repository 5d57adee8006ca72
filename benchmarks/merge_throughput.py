#!/usr/bin/env python
"""Throughput and peak-memory benchmark of `mergeedit merge` against the machine's I/O floor (and, optionally, mergekit).

Run by hand, not in CI (it writes gigabytes). What it does, in one run:

1. builds three Llama-shaped toy models (a base and two fine-tune-like variants) of the requested shape, or reuses them
   when the work folder already holds models of that exact shape and dtype;
2. measures baselines: the peak RSS of a Python process that only imports torch, and of `mergeedit merge --dry-run`;
3. measures the I/O floor: read every input shard file fully (os.preadv into one reused buffer), then write as many
   bytes as one merged model to brand-new files (split like the merge's output shards) and fsync them; best of a few;
4. runs `mergeedit merge` as a subprocess for each method (best of --repeat), recording wall time, the merge's own
   reported time and the child's peak RSS (from os.wait4, per child);
5. with --mergekit, runs mergekit-yaml on the same configs and reports it side by side.

Page cache: unless the inputs exceed RAM, the floor and all merges read the inputs from the page cache (the build or
the first read warms it). Every run starts after os.sync() so no one pays for the previous run's dirty pages. With
--cold, the inputs' cached pages are dropped (posix_fadvise DONTNEED, no privileges needed) before every floor
repetition and every merge, so each reads from disk: use it when the inputs exceed RAM, where otherwise whatever part
of them the previous run left cached (which depends on how that run read and wrote) speeds up the next one.

Examples:
    python benchmarks/merge_throughput.py --mergekit /tmp/mkvenv/bin/mergekit-yaml
    python benchmarks/merge_throughput.py --layers 24
    python benchmarks/merge_throughput.py --hidden 4096 --intermediate 11008 --layers 11 --heads 32 --kv-heads 32 \\
        --methods ties --memory-budget 1G --repeat 1 --floor-repeat 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mergeedit.core.units import parse_size  # noqa: E402
from mergeedit.models.toy import BENCH_170M, LlamaShape, build_llama, parameter_count  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
ITERATIVE = ("karcher",)  # iterative math: its ratio is reported, no target
TIME_TARGET = {"linear": 1.3, "task_arithmetic": 1.3} | {
    m: 2.0
    for m in (
        "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "slerp", "nuslerp",
        "multislerp", "model_stock", "ram", "ramplus_tl", "nearswap", "arcee_fusion", "passthrough",
    )
} | {m: None for m in ITERATIVE}
RANDOMIZED = ("dare_ties", "dare_linear", "della", "della_linear")  # mergekit draws other random masks: not compared
RSS_TARGET = 0.25  # of one input model
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
FLOOR_BUFFER = 64 * 1024**2
MB = 1e6

console = Console(width=None if sys.stdout.isatty() else 240)  # logs: wide enough for the table


# -- subprocess with per-child peak RSS ------------------------------------------------------------------------------
@dataclass
class ChildRun:
    seconds: float
    peak_rss: int  # bytes
    cpu_s: Optional[float]  # user + system seconds of the child
    returncode: int
    stdout: str
    stderr: str


TIME_BIN = shutil.which("time", path="/usr/bin:/bin")


def run_child(cmd: list[str], env: Optional[dict] = None) -> ChildRun:
    """Run `cmd`, timing it and reading its own peak RSS and CPU time.

    Through /usr/bin/time when there is one: Linux carries a process's peak RSS across fork and exec, so a child forked
    from this (large) benchmark process would report at least our RSS; a child of the small `time` process does not.
    """
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "rusage"
        full = [TIME_BIN, "-f", "%M %U %S", "-o", str(stats), *cmd] if TIME_BIN else cmd
        with open(Path(tmp) / "out", "wb+") as out, open(Path(tmp) / "err", "wb+") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(full, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if TIME_BIN:
            fields = stats.read_text().split()[-3:]  # time prefixes a line when the command fails
            peak, cpu = int(fields[0]) * 1024, float(fields[1]) + float(fields[2])
        else:  # an upper bound: includes this process's RSS at fork time
            peak, cpu = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
        return ChildRun(seconds, peak, cpu, proc.returncode, stdout, stderr)


# -- models and configs ----------------------------------------------------------------------------------------------
def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def reusable(folder: Path, shape: LlamaShape, dtype: str, variant: Optional[int], shards: int) -> bool:
    """True when `folder` holds a completely built toy model of this shape, dtype, variant and shard count."""
    try:
        meta = json.loads((folder / "toy_model.json").read_text())  # written last by build_llama
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("shape") == asdict(shape) and meta.get("variant") == variant and config.get("dtype") == dtype and len(list(folder.glob("*.safetensors"))) == shards


def build_models(models_dir: Path, shape: LlamaShape, dtype: str, shards: int) -> tuple[dict[str, Path], float, bool]:
    import torch

    paths = {}
    started = time.perf_counter()
    built = False
    for key, variant in (("base", None), ("ft1", 1), ("ft2", 2)):
        folder = models_dir / key
        if not reusable(folder, shape, dtype, variant, shards):
            shutil.rmtree(folder, ignore_errors=True)
            console.print(f"building {key} ({shape.layers} layers, {dtype}) in {folder} ...")
            build_llama(folder, shape, variant=variant, shards=shards, dtype=getattr(torch, dtype))
            built = True
        paths[key] = folder
    return paths, time.perf_counter() - started, built


def write_configs(config_dir: Path, models: dict[str, Path], dtype: str, methods: list[str]) -> dict[str, Path]:
    config_dir.mkdir(parents=True, exist_ok=True)
    b, f1, f2 = (str(models[k]) for k in ("base", "ft1", "ft2"))
    sparse = {"weight": 0.5, "density": 0.5}
    docs = {
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1 / 3}} for m in (b, f1, f2)]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (f1, f2)]},
    }
    for name in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        docs[name] = {"merge_method": name, "base_model": b, "models": [{"model": m, "parameters": dict(sparse)} for m in (f1, f2)]}
    pair = [{"model": f1, "parameters": {"weight": 0.6}}, {"model": f2, "parameters": {"weight": 0.4}}]
    docs |= {
        "sce": {"merge_method": "sce", "base_model": b, "models": [{"model": f1}, {"model": f2}], "parameters": {"select_topk": 0.5}},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": f1}], "parameters": {"t": 0.4}},
        "nuslerp": {"merge_method": "nuslerp", "base_model": b, "models": pair},
        "multislerp": {"merge_method": "multislerp", "base_model": b, "models": pair},
        "karcher": {"merge_method": "karcher", "models": [{"model": m} for m in (b, f1, f2)]},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": [{"model": f1}, {"model": f2}]},
        "ram": {"merge_method": "ram", "base_model": b, "models": [{"model": f1}, {"model": f2}]},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": b, "models": [{"model": f1}, {"model": f2}]},
        "nearswap": {"merge_method": "nearswap", "base_model": b, "models": [{"model": b}, {"model": f1}], "parameters": {"t": 0.001}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": b, "models": [{"model": b}, {"model": f1}]},
        "passthrough": {"merge_method": "passthrough", "models": [{"model": f1, "parameters": {"scale": 0.5}}]},
    }
    paths = {}
    for name in methods:
        doc = dict(docs[name], dtype=dtype)
        path = config_dir / f"{name}.yml"
        path.write_text(json.dumps(doc, indent=2) + "\n")  # JSON is YAML
        paths[name] = path
    return paths


# -- the I/O floor ---------------------------------------------------------------------------------------------------
@dataclass
class Floor:
    read_s: float
    write_s: float
    bytes_read: int
    bytes_written: int
    repetitions: int

    @property
    def seconds(self) -> float:
        return self.read_s + self.write_s


def floor_once(inputs: list[Path], out_bytes: int, shard_bytes: int, scratch: Path, tag: str) -> tuple[float, float, int]:
    buf = bytearray(FLOOR_BUFFER)
    view = memoryview(buf)
    read = 0
    started = time.perf_counter()
    for path in inputs:
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = 0
            while True:
                got = os.preadv(fd, [view], pos)
                if got == 0:
                    break
                pos += got
            read += pos
        finally:
            os.close(fd)
    read_s = time.perf_counter() - started

    folder = scratch / f"floor-{tag}"  # a new folder and new files every time: a merge never rewrites old files
    started = time.perf_counter()
    folder.mkdir(parents=True)
    left = out_bytes
    k = 0
    while left > 0:
        size = min(shard_bytes, left)
        fd = os.open(folder / f"shard-{k}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            done = 0
            while done < size:
                done += os.write(fd, view[: min(FLOOR_BUFFER, size - done)])
            os.fsync(fd)
        finally:
            os.close(fd)
        left -= size
        k += 1
    dfd = os.open(folder, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    write_s = time.perf_counter() - started
    shutil.rmtree(folder)
    return read_s, write_s, read


def settle(inputs: list[Path], cold: bool) -> None:
    """Before a timed run: flush dirty pages and, when `cold`, drop the inputs' pages from the page cache."""
    os.sync()
    if not cold:
        return
    for path in inputs:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_floor(inputs: list[Path], out_bytes: int, shard_bytes: int, scratch: Path, repetitions: int, cold: bool = False) -> Floor:
    best: Optional[tuple[float, float, int]] = None
    for r in range(repetitions):
        settle(inputs, cold)
        got = floor_once(inputs, out_bytes, shard_bytes, scratch, f"{os.getpid()}-{r}-{time.time_ns()}")
        console.print(f"  floor {r + 1}/{repetitions}: read {got[0]:.2f} s + write {got[1]:.2f} s = {got[0] + got[1]:.2f} s")
        if best is None or got[0] + got[1] < best[0] + best[1]:
            best = got
    assert best is not None
    return Floor(best[0], best[1], best[2], out_bytes, repetitions)


# -- merges ----------------------------------------------------------------------------------------------------------
@dataclass
class MergeResult:
    tool: str
    method: str
    seconds: list[float] = field(default_factory=list)  # wall, per repetition
    reported: list[Optional[float]] = field(default_factory=list)  # the tool's own timer (mergeedit only)
    sync_s: list[float] = field(default_factory=list)  # os.sync() after the run (mergekit does not fsync)
    peak_rss: list[int] = field(default_factory=list)
    cpu_s: list[Optional[float]] = field(default_factory=list)  # user + system seconds, per repetition
    output_bytes: int = 0
    error: Optional[str] = None

    @property
    def best(self) -> Optional[float]:
        totals = [s + y for s, y in zip(self.seconds, self.sync_s)]
        return min(totals) if totals else None

    @property
    def best_reported(self) -> Optional[float]:
        vals = [r for r in self.reported if r is not None]
        return min(vals) if vals else None

    @property
    def cpu_of_best(self) -> Optional[float]:
        if not self.seconds:
            return None
        k = min(range(len(self.seconds)), key=lambda i: self.seconds[i] + self.sync_s[i])
        return self.cpu_s[k]

    @property
    def rss(self) -> Optional[int]:
        return max(self.peak_rss) if self.peak_rss else None


def mergeedit_cmd(config: Path, out: Path, args) -> list[str]:
    return [
        args.mergeedit, "merge", str(config), str(out),
        "--memory-budget", args.memory_budget, "--out-shard-size", args.out_shard_size,
        "--random-seed", str(args.random_seed), "--no-copy-tokenizer",
    ]


def mergekit_cmd(config: Path, out: Path, args, itemsize: int) -> list[str]:
    # mergekit counts --out-shard-size in parameters, mergeedit in bytes: convert so the shards match.
    params_per_shard = max(1, parse_size(args.out_shard_size) // itemsize)
    return [
        args.mergekit, str(config), str(out), "--no-cuda", "--out-shard-size", str(params_per_shard),
        "--random-seed", str(args.random_seed), "--no-copy-tokenizer", "--quiet",
    ]


def child_env(args) -> Optional[dict]:
    if not args.env:
        return None
    env = dict(os.environ)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def run_merges(tool: str, configs: dict[str, Path], outputs: Path, args, itemsize: int, keep_last: bool, inputs: list[Path]) -> dict[str, MergeResult]:
    results = {}
    for method, config in configs.items():
        res = MergeResult(tool, method)
        results[method] = res
        for r in range(args.repeat):
            out = outputs / f"{tool}-{method}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = mergeedit_cmd(config, out, args) if tool == "mergeedit" else mergekit_cmd(config, out, args, itemsize)
            settle(inputs, args.cold)
            run = run_child(cmd, env=child_env(args) if tool == "mergeedit" else None)
            started = time.perf_counter()
            os.sync()
            synced = time.perf_counter() - started
            if run.returncode != 0:
                res.error = (run.stderr.strip() or run.stdout.strip()).splitlines()[-1:] or [f"exit {run.returncode}"]
                res.error = f"exit {run.returncode}: {res.error[0]}"
                console.print(f"  [red]{tool} {method} failed[/]: {res.error}")
                shutil.rmtree(out, ignore_errors=True)
                break
            res.seconds.append(run.seconds)
            res.sync_s.append(synced if tool == "mergekit" else 0.0)
            res.peak_rss.append(run.peak_rss)
            res.cpu_s.append(run.cpu_s)
            m = re.search(r"time\s+([0-9.]+)\s*s", run.stdout)
            res.reported.append(float(m.group(1)) if m else None)
            res.output_bytes = model_bytes(out)
            extra = f" (+{synced:.2f} s sync)" if tool == "mergekit" else (f" (engine {res.reported[-1]:.2f} s)" if res.reported[-1] else "")
            console.print(f"  {tool} {method} {r + 1}/{args.repeat}: {run.seconds:.2f} s{extra}, CPU {run.cpu_s:.2f} s, peak RSS {run.peak_rss / MB:.0f} MB")
            if not (keep_last and r == args.repeat - 1):
                shutil.rmtree(out, ignore_errors=True)
    return results


def compare_outputs(a: Path, b: Path) -> float:
    """Largest absolute difference between same-named tensors of two output folders (tensor by tensor)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        found = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                found.update({k: f for k in h.keys()})
        return found

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return math.inf
    worst = 0.0
    for name in sorted(ia):
        with safe_open(ia[name], "pt") as ha, safe_open(ib[name], "pt") as hb:
            x, y = ha.get_tensor(name).float(), hb.get_tensor(name).float()
        if x.shape != y.shape:
            return math.inf
        worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
    return worst


# -- report ----------------------------------------------------------------------------------------------------------
def fmt(x: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def mark(ok: Optional[bool]) -> str:
    return "" if ok is None else (" [green]ok[/]" if ok else " [red]MISS[/]")


def print_report(info: dict, floor: Floor, ours: dict[str, MergeResult], theirs: dict[str, MergeResult], baselines: dict, diffs: dict) -> None:
    model = info["model_bytes"]
    torch_rss = baselines["import_torch_rss"]
    console.print()
    console.print(
        f"[bold]shape[/] hidden {info['shape']['hidden']}, intermediate {info['shape']['intermediate']}, layers {info['shape']['layers']}, "
        f"vocab {info['shape']['vocab']}, {info['dtype']}: {info['parameters'] / 1e6:.0f}M parameters, "
        f"{model / MB:.0f} MB per model ({info['shards']} shards), 3 inputs = {3 * model / MB:.0f} MB; RAM {info['ram_bytes'] / 1e9:.1f} GB"
    )
    console.print(
        f"[bold]I/O floor[/] (best of {floor.repetitions}): read {floor.bytes_read / MB:.0f} MB in {floor.read_s:.2f} s "
        f"({floor.bytes_read / MB / max(floor.read_s, 1e-9):.0f} MB/s) + write {floor.bytes_written / MB:.0f} MB to new files + fsync in "
        f"{floor.write_s:.2f} s ({floor.bytes_written / MB / max(floor.write_s, 1e-9):.0f} MB/s) = [bold]{floor.seconds:.2f} s[/]"
    )
    if info.get("env"):
        console.print(f"[bold]mergeedit environment[/] {' '.join(info['env'])}")
    console.print(
        f"[bold]baselines[/] python + import torch: {torch_rss / MB:.0f} MB RSS, {baselines['import_torch_s']:.2f} s; "
        f"mergeedit merge --dry-run: {baselines['dry_run_rss'] / MB:.0f} MB RSS, {baselines['dry_run_s']:.2f} s"
    )
    cache = ", inputs dropped from the page cache before every run" if info.get("cold") else ""
    table = Table(title=f"mergeedit merge, memory budget {info['memory_budget']}, wall seconds = best of {info['repeat']}{cache}", title_justify="left")
    table.add_column("method")
    table.add_column("wall s", justify="right")
    table.add_column("engine s", justify="right")
    table.add_column("x floor (tgt)", justify="right")
    table.add_column("engine x floor", justify="right")
    table.add_column("CPU s", justify="right")
    table.add_column("RSS MB", justify="right")
    table.add_column("RSS %model (<25%)", justify="right")
    table.add_column("RSS-torch MB", justify="right")
    table.add_column("RSS-torch %model", justify="right")
    if theirs:
        table.add_column("mergekit s", justify="right")
        table.add_column("mk CPU s", justify="right")
        table.add_column("mk x floor", justify="right")
        table.add_column("mk RSS MB", justify="right")
        table.add_column("mk % model", justify="right")
        table.add_column("max|diff|", justify="right")
    for method, r in ours.items():
        target = TIME_TARGET.get(method)
        if r.error:
            row = [method, f"[red]{r.error}[/]"] + [""] * 8
        else:
            ratio = r.best / floor.seconds
            rss = r.rss
            row = [
                method,
                fmt(r.best),
                fmt(r.best_reported),
                f"{ratio:.2f} ({target:g}){mark(ratio <= target)}" if target is not None else f"{ratio:.2f} (iterative)",
                fmt(r.best_reported / floor.seconds if r.best_reported else None),
                fmt(r.cpu_of_best),
                f"{rss / MB:.0f}",
                f"{100 * rss / model:.1f}%{mark(rss < RSS_TARGET * model)}",
                f"{(rss - torch_rss) / MB:.0f}",
                f"{100 * (rss - torch_rss) / model:.1f}%{mark(rss - torch_rss < RSS_TARGET * model)}",
            ]
        if theirs:
            k = theirs.get(method)
            if k is None or k.error:
                row += [f"[red]{k.error if k else 'not run'}[/]", "", "", "", "", ""]
            else:
                row += [fmt(k.best), fmt(k.cpu_of_best), f"{k.best / floor.seconds:.2f}", f"{k.rss / MB:.0f}", f"{100 * k.rss / model:.0f}%", fmt(diffs.get(method), ".1e")]
        table.add_row(*row)
    console.print(table)
    notes = [
        "wall s: the whole `mergeedit merge` process (interpreter start, imports, plan, merge, fsync); engine s: the merge's own timer; "
        "CPU s: user + system seconds of that (best) run; peak RSS: the largest over the repetitions (from /usr/bin/time).",
        f"x floor: wall s / floor s; targets 1.3x (linear, task_arithmetic) and 2x (ties, dare). RSS target: < 25% of one input model ({RSS_TARGET * model / MB:.0f} MB), "
        "shown both as the raw peak and above the import-torch baseline.",
        "Peak RSS should not change when depth doubles: compare with a run at --layers 2N (or pass --compare JSON).",
    ]
    if theirs:
        notes.append("mergekit s includes an os.sync() after it exits (mergekit does not fsync; mergeedit does). max |diff|: mergeedit vs mergekit "
                     "output (dare_ties uses a different RNG, so it is not compared).")
    for n in notes:
        console.print(f"[dim]{n}[/]")


def print_comparison(path: Path, ours: dict[str, MergeResult], info: dict) -> None:
    prev = json.loads(path.read_text())
    table = Table(title=f"peak RSS vs {path} (layers {prev['info']['shape']['layers']} there, {info['shape']['layers']} here)", title_justify="left")
    for col in ("method", "RSS there MB", "RSS here MB", "change"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for method, r in ours.items():
        old = prev["mergeedit"].get(method, {}).get("peak_rss_bytes")
        if old and r.rss:
            table.add_row(method, f"{old / MB:.0f}", f"{r.rss / MB:.0f}", f"{100 * (r.rss - old) / old:+.1f}%")
    console.print(table)


def result_json(r: MergeResult, floor: Floor, model: int, torch_rss: int) -> dict:
    return {
        "wall_s": r.seconds, "cpu_s": r.cpu_s, "reported_s": r.reported, "sync_s": r.sync_s, "best_s": r.best, "best_reported_s": r.best_reported,
        "ratio_to_floor": (r.best / floor.seconds) if r.best else None, "peak_rss_bytes": r.rss,
        "peak_rss_fraction_of_model": (r.rss / model) if r.rss else None,
        "peak_rss_above_torch_bytes": (r.rss - torch_rss) if r.rss else None, "output_bytes": r.output_bytes, "error": r.error,
    }


# -- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    s = BENCH_170M
    p.add_argument("--work", type=Path, help="work folder (default: a fresh temp folder); models there are reused when their shape matches")
    p.add_argument("--keep", action="store_true", help="keep what this run created in the work folder (models, configs)")
    p.add_argument("--hidden", type=int, default=s.hidden)
    p.add_argument("--intermediate", type=int, default=s.intermediate)
    p.add_argument("--layers", type=int, default=s.layers)
    p.add_argument("--heads", type=int, default=s.heads)
    p.add_argument("--kv-heads", type=int, default=s.kv_heads)
    p.add_argument("--vocab", type=int, default=s.vocab)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--shards", type=int, default=4, help="input shards per model")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(TIME_TARGET)}")
    p.add_argument("--repeat", type=int, default=2, help="merges per method and tool; the best wall time is reported")
    p.add_argument("--floor-repeat", type=int, default=3, help="I/O floor repetitions; the best is reported")
    p.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before every timed run (see above)")
    p.add_argument("--memory-budget", default="256M")
    p.add_argument("--out-shard-size", default="5G", help="bytes (mergekit gets the same size in parameters)")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--mergeedit", default=str(Path(sys.executable).with_name("mergeedit")), help="the mergeedit CLI")
    p.add_argument("--mergekit", help="path to mergekit-yaml: also run mergekit on the same configs")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the mergeedit runs (diagnostics)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--compare", type=Path, help="a previous --json result: print the peak-RSS change per method")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in TIME_TARGET]
    if unknown:
        p.error(f"unknown method(s): {', '.join(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab)
    itemsize = DTYPES[args.dtype]
    params = parameter_count(shape)
    made_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="mergeedit-bench-")) if made_work else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    need = 4 * params * itemsize
    free = shutil.disk_usage(work).free
    console.print(f"work folder {work}: {params / 1e6:.0f}M parameters x {itemsize} B = {params * itemsize / MB:.0f} MB per model; "
                  f"free disk {free / 1e9:.1f} GB")
    outputs = work / "outputs"
    created: list[Path] = []
    try:
        models, build_s, built = build_models(work / "models", shape, args.dtype, args.shards)
        if built:
            created.append(work / "models")
        console.print(f"models {'built' if built else 'reused'} in {build_s:.1f} s")
        if free + (3 * params * itemsize if not built else 0) < need * 1.05:
            console.print(f"[yellow]warning:[/] little disk left for outputs ({free / 1e9:.1f} GB free)")
        configs = write_configs(work / "configs", models, args.dtype, args.methods)
        created.append(work / "configs")
        outputs.mkdir(exist_ok=True)
        created.append(outputs)
        model = model_bytes(models["base"])
        inputs = sorted(f for k in ("base", "ft1", "ft2") for f in models[k].glob("*.safetensors"))

        console.print("baselines ...")
        if not TIME_BIN:
            console.print("[yellow]warning:[/] no /usr/bin/time: peak RSS includes this process's RSS at fork (an upper bound)")
        torch_run = run_child([sys.executable, "-c", "import torch"])
        dry = run_child(mergeedit_cmd(configs[args.methods[0]], outputs / "dry-run", args) + ["--dry-run"], env=child_env(args))
        if dry.returncode != 0:
            console.print(f"[red]mergeedit --dry-run failed:[/] {dry.stderr.strip()[-2000:]}")
            return 1
        baselines = {"import_torch_rss": torch_run.peak_rss, "import_torch_s": torch_run.seconds, "dry_run_rss": dry.peak_rss, "dry_run_s": dry.seconds}

        console.print("I/O floor ...")
        floor = measure_floor(inputs, model, parse_size(args.out_shard_size), outputs, args.floor_repeat, args.cold)

        console.print("mergeedit ...")
        ours = run_merges("mergeedit", configs, outputs, args, itemsize, keep_last=bool(args.mergekit), inputs=inputs)
        theirs: dict[str, MergeResult] = {}
        diffs: dict[str, float] = {}
        if args.mergekit:
            console.print("mergekit ...")
            theirs = run_merges("mergekit", configs, outputs, args, itemsize, keep_last=True, inputs=inputs)
            for method in args.methods:
                a, b = outputs / f"mergeedit-{method}-{args.repeat - 1}", outputs / f"mergekit-{method}-{args.repeat - 1}"
                if method not in RANDOMIZED and a.exists() and b.exists():
                    diffs[method] = compare_outputs(a, b)
                shutil.rmtree(a, ignore_errors=True)
                shutil.rmtree(b, ignore_errors=True)

        info = {
            "shape": asdict(shape), "dtype": args.dtype, "parameters": params, "model_bytes": model, "shards": args.shards,
            "memory_budget": args.memory_budget, "out_shard_size": args.out_shard_size, "repeat": args.repeat,
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "cpus": os.cpu_count(), "build_s": build_s, "env": args.env,
            "cold": args.cold,
        }
        print_report(info, floor, ours, theirs, baselines, diffs)
        if args.compare:
            print_comparison(args.compare, ours, info)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "info": info, "baselines": baselines, "floor": dict(asdict(floor), seconds=floor.seconds),
                "mergeedit": {m: result_json(r, floor, model, baselines["import_torch_rss"]) for m, r in ours.items()},
                "mergekit": {m: result_json(r, floor, model, baselines["import_torch_rss"]) for m, r in theirs.items()},
                "mergekit_max_abs_diff": diffs,
            }, indent=2) + "\n")
            console.print(f"results written to {args.json}")
        return 0 if all(not r.error for r in ours.values()) else 1
    finally:
        shutil.rmtree(outputs, ignore_errors=True)
        if not args.keep:
            for path in created:
                shutil.rmtree(path, ignore_errors=True)
            if made_work:
                shutil.rmtree(work, ignore_errors=True)
        else:
            console.print(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
