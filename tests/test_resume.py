"""`mergeedit merge --resume`: a merge SIGKILLed at any point, re-run with --resume, gives the uninterrupted bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

from mergeedit.io.integrity import MANIFEST, sha256_file
from mergeedit.io.output_dir import TMP_MARK
from mergeedit.io.resume import JOURNAL, read_journal
from mergeedit.io.shard_writer import layout_shards
from mergeedit.merging.merge import MergeOptions, load_plan, output_entries

SHARD_SIZE = "40K"
CONFIG = """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.3}}
"""


def _cli(*args: str, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MERGEEDIT_KILL_AFTER_TENSORS", None)
    if kill_after is not None:
        env["MERGEEDIT_KILL_AFTER_TENSORS"] = str(kill_after)
    code = "import sys; from mergeedit.cli import main; sys.argv[0] = 'mergeedit'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_MARK}")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("resume")
    cfg = write_config(root, CONFIG.format(**{k: models[k] for k in ("base", "a", "b")}))
    reference = root / "reference"
    assert _cli("merge", str(cfg), str(reference), "--out-shard-size", SHARD_SIZE).returncode == 0
    shards = layout_shards(output_entries(load_plan(cfg, MergeOptions())), 40_000)
    assert len(shards) >= 4, "the test needs several shards"
    first_of_shard = [sum(len(s.entries) for s in shards[:i]) for i in range(len(shards))]
    return root, cfg, _files(reference), shards, first_of_shard


def _kill_then_resume(root: Path, cfg: Path, name: str, kill_after: int) -> tuple[Path, subprocess.CompletedProcess, dict]:
    out = root / name
    killed = _cli("merge", str(cfg), str(out), "--out-shard-size", SHARD_SIZE, kill_after=kill_after)
    assert killed.returncode == -9
    assert not out.exists()
    (tmp,) = _leftovers(out)
    journal = read_journal(tmp)
    resumed = _cli("merge", str(cfg), str(out), "--out-shard-size", SHARD_SIZE, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _leftovers(out) == []
    return out, resumed, journal


@pytest.mark.parametrize("point", ["first-tensor", "between-shards", "mid-shard", "after-last-tensor"])
def test_killed_merge_resumes_to_identical_bytes(setup, point):
    root, cfg, reference, shards, first = setup
    total = sum(len(s.entries) for s in shards)
    kill_after = {"first-tensor": 1, "between-shards": first[2], "mid-shard": first[2] + 1, "after-last-tensor": total}[point]
    out, resumed, journal = _kill_then_resume(root, cfg, point, kill_after)
    assert _files(out) == reference
    assert JOURNAL not in os.listdir(out)
    # Shards the killed run finished were journaled and then reused, not recomputed.
    finished = [s.filename for s in shards if s.filename in journal["shards"]]
    expected_reused = {"first-tensor": 0, "between-shards": 1, "mid-shard": 2, "after-last-tensor": len(shards) - 1}[point]
    assert len(finished) == expected_reused
    if expected_reused:
        assert f"{expected_reused} of {len(shards)} shard(s) reused" in resumed.stdout
    else:
        assert "reused" not in resumed.stdout


def test_resume_redoes_a_journaled_shard_whose_bytes_changed(setup):
    root, cfg, reference, shards, first = setup
    out = root / "corrupted"
    assert _cli("merge", str(cfg), str(out), "--out-shard-size", SHARD_SIZE, kill_after=first[3] + 1).returncode == -9
    (tmp,) = _leftovers(out)
    second = tmp / shards[1].filename
    data = bytearray(second.read_bytes())
    data[-1] ^= 0xFF
    second.write_bytes(bytes(data))
    resumed = _cli("merge", str(cfg), str(out), "--out-shard-size", SHARD_SIZE, "--resume")
    assert resumed.returncode == 0
    assert "1 of" in resumed.stdout  # only the first shard still matched its checksum
    assert _files(out) == reference
    assert _cli("verify", str(out)).returncode == 0


def test_resume_ignores_a_leftover_from_a_different_merge(setup, models):
    root, cfg, reference, shards, first = setup
    out = root / "changed"
    other = write_config(root, CONFIG.format(**{k: models[k] for k in ("base", "a", "b")}).replace("0.7", "0.6"), "other.yaml")
    assert _cli("merge", str(other), str(out), "--out-shard-size", SHARD_SIZE, kill_after=first[2] + 1).returncode == -9
    resumed = _cli("merge", str(cfg), str(out), "--out-shard-size", SHARD_SIZE, "--resume")
    assert resumed.returncode == 0
    assert "reused" not in resumed.stdout
    assert _files(out) == reference
    assert _leftovers(out) == []


def test_without_resume_a_leftover_is_discarded(setup):
    root, cfg, reference, shards, first = setup
    out = root / "fresh"
    assert _cli("merge", str(cfg), str(out), "--out-shard-size", SHARD_SIZE, kill_after=first[2] + 1).returncode == -9
    fresh = _cli("merge", str(cfg), str(out), "--out-shard-size", SHARD_SIZE)
    assert fresh.returncode == 0 and "reused" not in fresh.stdout
    assert _files(out) == reference
    assert _leftovers(out) == []


def test_manifest_of_resumed_output_matches_file_hashes(setup):
    root, cfg, reference, shards, first = setup
    out, _, _ = _kill_then_resume(root, cfg, "manifest", first[2] + 1)
    import json

    listed = json.loads((out / MANIFEST).read_text())["files"]
    for name, entry in listed.items():
        assert sha256_file(out / name) == entry["sha256"]
