"""Partitioned merges (`--part I/N`, `--assemble`, `--ray`): N workers at once give the single-process bytes; a missing,
unfinished, corrupt or stale part is one line naming it; a killed part resumes; `verify` checks parts."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_config

from mergeedit.core.errors import MergeEditError
from mergeedit.io.parts import RECORD, parts_folder, read_record
from mergeedit.io.resume import JOURNAL, read_journal
from mergeedit.io.shard_writer import OutputEntry, Shard, layout_shards
from mergeedit.merging.merge import MergeOptions, load_plan, output_entries
from mergeedit.merging.partition import assign_parts

SHARD_SIZE = "40K"
CONFIG = """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7, density: {density}}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.3}}
"""


def _cli(*args, kill_after: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MERGEEDIT_KILL_AFTER_TENSORS", None)
    if kill_after is not None:
        env["MERGEEDIT_KILL_AFTER_TENSORS"] = str(kill_after)
    code = "import sys; from mergeedit.cli import main; sys.argv[0] = 'mergeedit'; main()"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run(*args, kill_after: int | None = None) -> subprocess.CompletedProcess:
    proc = _cli(*args, kill_after=kill_after)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _parts_at_once(cfg: Path, out: Path, of: int, *extra: str) -> list[subprocess.CompletedProcess]:
    """All N workers started together, as a job array would, each in its own process."""
    procs = [_cli("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--part", f"{i}/{of}", *extra) for i in range(1, of + 1)]
    results = []
    for p in procs:
        o, e = p.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return results


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _one_line_error(result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    message = " ".join(result.stderr.split())
    assert message.startswith("error:") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.fixture(scope="module")
def setup(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("partition")
    names = {k: models[k] for k in ("base", "a", "b")}
    cfg = write_config(root, CONFIG.format(density=0.5, **names))
    reference = root / "reference"
    single = _run("merge", cfg, reference, "--out-shard-size", SHARD_SIZE)
    assert single.returncode == 0, single.stderr
    shards = layout_shards(output_entries(load_plan(cfg, MergeOptions())), 40_000)
    assert len(shards) >= 4, "the test needs more shards than workers"
    return root, cfg, _files(reference), shards


# -- the assignment --------------------------------------------------------------------------------------------------
def _shards(sizes: list[int]) -> list[Shard]:
    return [Shard(f"s{i}", [OutputEntry(f"t{i}", torch.uint8, (n,))]) for i, n in enumerate(sizes)]


def test_assignment_is_balanced_by_bytes_worked_by_hand():
    # Largest first, each to the lightest part: 5 -> p1 (5); 3 -> p2 (3); 3 -> p2 (6); 2 -> p2 (8)?  no: p1 has 5 < 6,
    # so 2 -> p1 (7); 1 -> p2 (7). Within a part, the plan's order.
    assert assign_parts(_shards([5, 3, 3, 2, 1]), 2) == [[0, 3], [1, 2, 4]]
    # Equal sizes: ties go to the lower shard and the lower part, round-robin.
    assert assign_parts(_shards([4] * 5), 3) == [[0, 3], [1, 4], [2]]
    # More workers than shards: the extra parts have nothing to do.
    assert assign_parts(_shards([2, 9]), 4) == [[1], [0], [], []]
    assert assign_parts(_shards([7, 1, 4]), 1) == [[0, 1, 2]]


def test_every_shard_is_in_exactly_one_part(setup):
    _, _, _, shards = setup
    for of in (1, 2, 3, 7):
        parts = assign_parts(shards, of)
        assert sorted(i for p in parts for i in p) == list(range(len(shards)))
        loads = [sum(shards[i].nbytes for i in p) for p in parts]
        assert max(loads) - min(loads) <= max(s.nbytes for s in shards)  # greedy bound: within one shard


# -- N workers at once equal one process -------------------------------------------------------------------------------
@pytest.mark.parametrize("of", [1, 2, 3])
def test_parts_run_at_once_then_assembled_equal_the_single_process_bytes(setup, of):
    root, cfg, reference, shards = setup
    out = root / f"parts-{of}"
    results = _parts_at_once(cfg, out, of)
    for i, r in enumerate(results, 1):
        assert r.returncode == 0, r.stderr
        assert f"part {i}/{of}:" in r.stdout
    assert not out.exists(), "a part never writes OUT itself"
    records = sorted((read_record(p) for p in parts_folder(out).iterdir() if not p.name.startswith(".")), key=lambda r: r.part)
    assert [r.part for r in records] == list(range(1, of + 1))
    assert sorted(n for r in records for n in r.shards) == sorted(s.filename for s in shards)
    verified = _run("verify", out)
    assert verified.returncode == 0 and verified.stdout.count("ok: part") == of, verified.stdout + verified.stderr
    assembled = _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--assemble")
    assert assembled.returncode == 0, assembled.stderr
    assert _files(out) == reference
    assert not parts_folder(out).exists(), "the parts are removed once OUT is in place"
    assert [p.name for p in root.iterdir() if p.name.startswith(f".{out.name}")] == []
    assert _run("verify", out).returncode == 0


# -- what assemble refuses ---------------------------------------------------------------------------------------------
def test_a_missing_part_is_named_and_nothing_is_written(setup):
    root, cfg, _, _ = setup
    out = root / "missing"
    for i in (1, 3):
        assert _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--part", f"{i}/3").returncode == 0
    result = _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--assemble")
    _one_line_error(result, "part 2/3 is missing", "no finished", "part-0002-of-0003", "--part 2/3")
    assert not out.exists() and parts_folder(out).is_dir()


def test_no_parts_at_all(setup):
    root, cfg, _, _ = setup
    result = _run("merge", cfg, root / "nothing", "--out-shard-size", SHARD_SIZE, "--assemble")
    _one_line_error(result, "no finished parts", "--part I/N")


def test_a_corrupt_part_is_named_by_assemble_and_verify_and_resume_redoes_only_it(setup):
    root, cfg, reference, shards = setup
    out = root / "corrupt"
    assert all(r.returncode == 0 for r in _parts_at_once(cfg, out, 2))
    part2 = parts_folder(out) / "part-0002-of-0002"
    record = read_record(part2)
    victim = sorted(record.shards)[0]
    data = bytearray((part2 / victim).read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    (part2 / victim).write_bytes(bytes(data))

    for result in (_run("verify", out), _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--assemble")):
        _one_line_error(result, "part 2/2", victim, "sha256", "--resume")
    assert not out.exists()

    rerun = _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--part", "2/2")
    _one_line_error(rerun, "part 2/2 of this merge is already finished", "--resume", "--overwrite")
    resumed = _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--part", "2/2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    kept = len(record.shards) - 1
    assert (f"{kept} reused" in resumed.stdout) if kept else ("reused" not in resumed.stdout), resumed.stdout
    assert _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--assemble").returncode == 0
    assert _files(out) == reference


def test_a_part_of_another_merge_is_stale(setup, models):
    root, cfg, _, _ = setup
    out = root / "stale"
    other = write_config(root, CONFIG.format(density=0.9, **{k: models[k] for k in ("base", "a", "b")}), name="other.yaml")
    assert all(r.returncode == 0 for r in _parts_at_once(other, out, 2))
    result = _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--assemble")
    _one_line_error(result, "computed for a different merge", "--part I/N")
    # Parts of the right merge replace the stale ones without --overwrite (they are mergeedit's own scratch).
    assert _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--part", "1/2").returncode == 0
    result = _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--assemble")
    _one_line_error(result, "part 2/2 is missing", "computed for a different merge")


# -- a killed worker ---------------------------------------------------------------------------------------------------
def test_a_killed_part_leaves_nothing_finished_and_resumes_to_identical_bytes(setup):
    root, cfg, reference, shards = setup
    out = root / "killed"
    mine = [shards[i] for i in assign_parts(shards, 2)[0]]
    assert len(mine) >= 2, "part 1/2 needs two shards to be killed between them"
    killed = _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--part", "1/2", kill_after=len(mine[0].entries) + 1)
    assert killed.returncode == -9
    assert _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--part", "2/2").returncode == 0
    (work,) = [p for p in parts_folder(out).iterdir() if p.name.startswith(".part-0001-of-0002.work-")]
    assert list(read_journal(work)["shards"]) == [mine[0].filename]
    assert not (parts_folder(out) / "part-0001-of-0002").exists(), "no partial part under a finished name"
    _one_line_error(_run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--assemble"), "part 1/2 is missing", "did not finish", "--resume")

    resumed = _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--part", "1/2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "1 reused (sha256 verified)" in resumed.stdout, resumed.stdout
    done = parts_folder(out) / "part-0001-of-0002"
    assert sorted(p.name for p in done.iterdir()) == sorted([RECORD] + [s.filename for s in mine])
    assert JOURNAL not in os.listdir(done)
    assert [p.name for p in parts_folder(out).iterdir() if p.name.startswith(".part-")] == []
    assert _run("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--assemble").returncode == 0
    assert _files(out) == reference


# -- usage -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,needles",
    [
        (["--part", "0/3"], ["--part 0/3", "numbered 1 to 3", "1-based"]),
        (["--part", "4/3"], ["--part 4/3", "numbered 1 to 3"]),
        (["--part", "2"], ["--part 2", "expected I/N"]),
        (["--part", "1/0"], ["--part 1/0", "at least 1"]),
        (["--workers", "2"], ["--workers", "with --ray"]),
        (["--part", "1/2", "--assemble"], ["--part and --assemble", "one of them"]),
        (["--assemble", "--dry-run"], ["--assemble cannot be combined with --dry-run"]),
    ],
)
def test_bad_partition_options_are_one_line(setup, run_cli, args, needles):
    root, cfg, _, _ = setup
    result = run_cli("merge", cfg, root / "usage", *args)
    assert result.code == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert message.startswith("error:") and "Traceback" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (root / "usage").exists() and not parts_folder(root / "usage").exists()


def test_a_part_fails_before_computing_when_out_is_taken(setup, run_cli):
    root, cfg, _, _ = setup
    taken = root / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    result = run_cli("merge", cfg, taken, "--part", "1/2")
    assert result.code == 2 and "already exists" in result.stderr
    assert not parts_folder(taken).exists()


# -- Ray -----------------------------------------------------------------------------------------------------------------
def test_ray_runs_the_parts_on_a_local_two_cpu_cluster(setup):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mergeedit[ray]'): --ray is not tested")
    from mergeedit.pipeline.cluster import run_on_ray

    root, cfg, reference, shards = setup
    out = root / "ray"
    seen: dict[int, list[tuple[int, int, str]]] = {}
    options = MergeOptions(out_shard_size=40_000)
    # First every worker is killed after its second tensor (a node lost mid-part): one line, and the parts stay.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"MERGEEDIT_KILL_AFTER_TENSORS": "2"}})
    try:
        with pytest.raises(MergeEditError, match=r"part [12]/2 failed on the Ray cluster: .*run again with --resume"):
            run_on_ray(cfg, out, options, None)
    finally:
        ray.shutdown()
    assert not out.exists() and parts_folder(out).is_dir()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run_on_ray(cfg, out, replace(options, resume=True), None, lambda i, n, done, total, state: seen.setdefault(i, []).append((done, total, state)))
    finally:
        ray.shutdown()
    assert report.of == 2, "the default: one part per CPU of the cluster"
    assert [p.part for p in report.parts] == [1, 2]
    assert _files(out) == reference
    assert not parts_folder(out).exists()
    for i in (1, 2):
        done, total, state = seen[i][-1]
        assert state.startswith("done") and done == total == sum(shards[j].nbytes for j in assign_parts(shards, 2)[i - 1])


# -- SLURM ---------------------------------------------------------------------------------------------------------------
SBATCH_SHIM = """#!/usr/bin/env bash
# A stand-in for sbatch: runs a --wrap command here, once per --array task (SLURM_ARRAY_TASK_ID set), and prints a job id.
array=""; wrap=""
for a in "$@"; do case "$a" in --array=*) array=${a#--array=};; --wrap=*) wrap=${a#--wrap=};; esac; done
echo "sbatch $*" >> "$SHIM_LOG"
if [ -n "$array" ]; then
    for ((i=${array%-*}; i<=${array#*-}; i++)); do SLURM_ARRAY_TASK_ID=$i bash -c "$wrap" >&2 || exit 1; done
else
    bash -c "$wrap" >&2 || exit 1
fi
echo 4242
"""


def test_the_slurm_example_runs_its_parts_and_assembles(setup, tmp_path):
    import shutil

    root, cfg, reference, _ = setup
    mergeedit = shutil.which("mergeedit", path=str(Path(sys.executable).parent))
    if mergeedit is None:
        pytest.skip("the mergeedit script is not installed next to this Python")
    shim = tmp_path / "bin" / "sbatch"
    shim.parent.mkdir()
    shim.write_text(SBATCH_SHIM)
    shim.chmod(0o755)
    out = root / "slurm"
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "MERGEEDIT": mergeedit, "MERGE_ARGS": f"--out-shard-size {SHARD_SIZE}",
           "SHIM_LOG": str(tmp_path / "sbatch.log")}
    script = Path(__file__).resolve().parents[1] / "examples" / "slurm-merge.sh"
    result = subprocess.run(["bash", str(script), str(cfg), str(out), "3"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    submitted = (tmp_path / "sbatch.log").read_text().splitlines()
    assert "--array=1-3" in submitted[0] and "--dependency=afterok:4242" in submitted[1]
    assert result.stderr.count("part ") >= 3 and "assembled 3 part(s)" in result.stderr and "files match the manifest" in result.stderr
    assert _files(out) == reference


def test_dry_run_of_a_part_shows_every_parts_share_and_writes_nothing(setup, run_cli):
    root, cfg, _, shards = setup
    out = root / "dry"
    result = run_cli("merge", cfg, out, "--out-shard-size", SHARD_SIZE, "--part", "2/3", "--dry-run")
    assert result.code == 0, result.stderr
    assert f"{len(shards)} shard(s) dealt out to 3 part(s)" in result.stdout and "2/3 *" in result.stdout
    for s in shards:
        assert result.stdout.count(s.filename) == 1
    assert not out.exists() and not parts_folder(out).exists()
