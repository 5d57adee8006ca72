"""Issue 15 hardening, through the real console script: exit 2, one line naming the culprit, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from mergeedit.core.json_shape import MANIFEST, shape_problem
from mergeedit.core.paths import containment_problem

CLI = Path(sys.executable).parent / "mergeedit"


def _cli(*args, cwd=None):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_overwrite_refuses_a_folder_mergeedit_did_not_write(tmp_path, models):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _cli("merge", cfg, out, "--overwrite")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a mergeedit output" in " ".join(r.stderr.split())
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_the_current_folder(tmp_path, models):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    r = _cli("merge", "m.yaml", ".", "--overwrite", cwd=tmp_path)
    assert r.returncode == 2 and "current folder" in " ".join(r.stderr.split()) and cfg.exists()


@given(st.text(max_size=20))
def test_containment_never_lets_a_path_climb_out(entry):
    folder = Path("/tmp/hardening-folder")
    if containment_problem(entry, folder) is None:
        assert (folder / entry).resolve().is_relative_to(folder.resolve())


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3)))
def test_shape_check_never_raises_and_accepts_only_manifests(value):
    problem = shape_problem(value, MANIFEST)
    if problem is None:
        assert isinstance(value, dict) and isinstance(value["files"], dict) and value["files"]
