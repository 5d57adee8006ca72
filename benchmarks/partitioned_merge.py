#!/usr/bin/env python
"""Overhead of partitioning a merge (`--part I/N` + `--assemble`) against one process, on the same inputs, in one run.

Run by hand, not in CI (it writes gigabytes). Builds (or reuses) three Llama-shaped toy models of 650 MB each (the
170M-parameter shape in float32, as merge_throughput.py builds them), then times a TIES merge:

- as one process (`mergeedit merge`), the baseline;
- as N parts (N = 1, 2, 4 by default) run one after another, then `--assemble`;
- as N parts started at once (as a job array on one machine would), then `--assemble`;

and checks each assembled output is byte-identical to the baseline's. Every run starts after os.sync(); the inputs stay
in the page cache (they fit in RAM), so this measures the CPU and write cost of partitioning, not a cluster's disks.
On a machine with fewer cores than parts, parts at once share the cores: the figure shows the overhead, not a speedup.

    python benchmarks/partitioned_merge.py --work /tmp/partbench --parts 1 2 4
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from merge_throughput import build_models, model_bytes  # noqa: E402

from mergeedit.models.toy import BENCH_170M  # noqa: E402

CONFIG = """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: float32
"""


def mergeedit(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from mergeedit.cli import main; sys.argv[0] = 'mergeedit'; main()", *args]


LAST_OUTPUT: list[str] = []


def timed(cmds: list[list[str]]) -> float:
    """Start every command at once, wait for all; seconds from the first start to the last exit (process start and
    imports included: each part is a process of its own, as on a cluster). Their stdout goes to LAST_OUTPUT."""
    os.sync()
    started = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    LAST_OUTPUT.clear()
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(p.args[3:])}\n{err[-2000:]}")
        LAST_OUTPUT.append(out)
    return time.perf_counter() - started


def reported_seconds(pattern: str) -> float:
    """The seconds the command itself reports (its work, without process start and imports)."""
    import re

    found = [float(m) for out in LAST_OUTPUT for m in re.findall(pattern, out)]
    return sum(found)


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/mergeedit-partbench"), help="models are built here once and reused")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out-shard-size", default="100M", help="output shard size: partitioning deals out whole shards")
    p.add_argument("--memory-budget", default="1G", help="per process")
    a = p.parse_args()
    models, build_s, built = build_models(a.work / "models", BENCH_170M, "float32", shards=3)
    size = sum(model_bytes(m) for m in models.values())
    config = a.work / "ties.yaml"
    config.write_text(CONFIG.format(**{k: str(v) for k, v in models.items()}))
    common = ["--out-shard-size", a.out_shard_size, "--memory-budget", a.memory_budget]
    outs = a.work / "outputs"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    print(f"inputs: 3 models, {size / 1e6:.0f} MB in all ({'built' if built else 'reused'}); cpu: {cpu_model()}, {len(os.sched_getaffinity(0))} cores")
    reference = outs / "single"
    single = timed([mergeedit("merge", str(config), str(reference), *common)])
    print(f"{'single process':<34} {single:7.2f} s")
    rows = []
    for n in a.parts:
        for mode in ("one after another", "at once"):
            out = outs / f"parts-{n}-{mode.replace(' ', '-')}"
            cmds = [mergeedit("merge", str(config), str(out), *common, "--part", f"{i}/{n}") for i in range(1, n + 1)]
            parts_s = sum(timed([c]) for c in cmds) if mode == "one after another" else timed(cmds)
            assemble_s = timed([mergeedit("merge", str(config), str(out), *common, "--assemble")])
            assemble_work = reported_seconds(r"verified and linked in ([0-9.]+) s")
            ok = same_bytes(out, reference)
            rows.append((n, mode, parts_s, assemble_s, ok))
            print(f"{n} part(s) {mode:<24} {parts_s:7.2f} s + assemble {assemble_s:5.2f} s (its own work {assemble_work:.2f} s) = "
                  f"{parts_s + assemble_s:7.2f} s ({(parts_s + assemble_s) / single:.2f}x single){'' if ok else '  BYTES DIFFER'}")
            shutil.rmtree(out)
    shutil.rmtree(reference)


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
