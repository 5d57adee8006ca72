"""What the executor owns and leaves behind: its compiled-kernel state is its own (a merge's --kernels never changes
another's), and the malloc settings a merge runs under are set back when it ends, error or not."""

from __future__ import annotations

import pytest
from conftest import write_config

from mergeedit.merging import buffers
from mergeedit.merging.executor import Executor
from mergeedit.merging.merge import MergeOptions, load_plan, write_merge
from mergeedit.merging.methods import fused


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_merge_allocator_sets_the_merge_values_then_sets_them_back_even_on_error():
    libc = FakeLibc()
    with pytest.raises(RuntimeError):
        with buffers.merge_allocator(libc):
            assert libc.calls == [
                (buffers.M_MMAP_THRESHOLD, buffers.MMAP_THRESHOLD), (buffers.M_TRIM_THRESHOLD, buffers.TRIM_THRESHOLD), (buffers.M_ARENA_MAX, 1)
            ]
            raise RuntimeError("a merge failed")
    after = dict(libc.calls[3:])
    assert after[buffers.M_MMAP_THRESHOLD] == 32 << 20 and after[buffers.M_TRIM_THRESHOLD] == 64 << 20
    assert after[buffers.M_ARENA_MAX] > 1  # threads started after the merge get arenas of their own again


def test_a_whole_merge_runs_inside_the_allocator_scope_and_leaves_it(tmp_path, models, monkeypatch):
    scopes = []
    real = buffers.merge_allocator

    def spy(libc=None):
        libc = FakeLibc()
        scopes.append(libc)
        return real(libc)

    monkeypatch.setattr("mergeedit.merging.executor.merge_allocator", spy)
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1.0}}\n")
    opts = MergeOptions(fsync=False)
    write_merge(load_plan(cfg, opts), tmp_path / "out", opts)
    assert len(scopes) == 1 and len(scopes[0].calls) == 6  # three set on entry, three set back on exit


def test_each_merge_owns_its_compiler_and_eager_has_none(tmp_path, models):
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1.0}}\n")
    plan = load_plan(cfg, MergeOptions())
    one, two = (Executor(plan, writer=None, budget=1 << 30, kernels="fused") for _ in range(2))
    assert isinstance(one.compiler, fused.KernelCompiler) and one.compiler is not two.compiler
    assert Executor(plan, writer=None, budget=1 << 30, kernels="eager").compiler is None
    assert not hasattr(fused, "compiler")  # no process-wide switch a merge could leave flipped
