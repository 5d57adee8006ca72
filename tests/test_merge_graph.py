"""Merge graphs (mergekit-multi's multi-document YAML) and the `modules:` layout, through the real CLI.

A graph must produce exactly the bytes of running its merges one after another through disk, with no intermediate
folder written, under any memory budget; `modules: {default: ...}` must merge exactly like the same slices.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from string import Template

import pytest
import torch
from conftest import write_config

from mergeedit.merging.merge import MergeOptions, load_plan
from mergeedit.models.toy import load_state_dict

# Each graph: (node name or None for the unnamed final merge, YAML with $a $b $c $base and $<node> references).
LINEAR_THEN_TIES = [
    ("ab", """
        merge_method: linear
        models:
          - model: $a
            parameters: {weight: 0.7}
          - model: $b
            parameters: {weight: 0.3}
    """),
    (None, """
        merge_method: ties
        base_model: $base
        models:
          - model: $ab
            parameters: {weight: 1.0, density: 0.5}
          - model: $c
            parameters: {weight: 0.8, density: 0.7}
    """),
]
# Statistics in the upstream merge, a chain of two computed merges, and the unnamed final merge not last in the file.
TIES_CHAIN = [
    ("ab", """
        merge_method: ties
        base_model: $base
        models:
          - model: $a
            parameters: {weight: 0.6, density: 0.4}
          - model: $b
            parameters: {weight: 0.5, density: 0.6}
    """),
    (None, """
        merge_method: linear
        models:
          - model: $abc
            parameters: {weight: 0.25}
          - model: $a
            parameters: {weight: 0.75}
    """),
    ("abc", """
        merge_method: task_arithmetic
        base_model: $base
        models:
          - model: $ab
            parameters: {weight: 1.0}
          - model: $c
            parameters: {weight: 0.5}
    """),
]


def linear(*refs: str, weight: str = "") -> str:
    """A linear merge config of the given `$name` references (weights only when asked)."""
    params = f"\n    parameters: {{weight: {weight}}}" if weight else ""
    return "merge_method: linear\nmodels:\n" + "".join(f"  - model: {r}{params}\n" for r in refs)


def _render(text: str, refs: dict[str, str]) -> str:
    return Template(textwrap.dedent(text)).substitute(refs)


def write_graph(folder: Path, models: dict[str, Path], graph, name: str = "graph.yaml") -> Path:
    refs = {k: str(v) for k, v in models.items()} | {n: n for n, _ in graph if n}
    docs = [(f"name: {n}\n" if n else "") + _render(text, refs) for n, text in graph]
    return write_config(folder, "---\n".join(docs), name)


def run_through_disk(run_cli, folder: Path, models: dict[str, Path], graph, out: Path) -> None:
    """The reference: each merge on its own, in dependency order, its output a folder the later ones read."""
    refs = {k: str(models[k]) for k in ("a", "b", "c", "base")} | {n: str(folder / n) for n, _ in graph if n}
    remaining = list(graph)
    while remaining:
        name, text = next((n, t) for n, t in remaining if not any(re.search(rf"\${m}\b", t) for m, _ in remaining if m and m != n))
        remaining.remove((name, text))
        cfg = write_config(folder, _render(text, refs), f"{name or 'final'}.yaml")
        result = run_cli("merge", cfg, folder / name if name else out, "--no-copy-tokenizer")
        assert result.code == 0, result.stderr


def assert_same_tensors(got: Path, expected: Path) -> None:
    a, b = load_state_dict(got), load_state_dict(expected)
    assert set(a) == set(b) and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("graph", [LINEAR_THEN_TIES, TIES_CHAIN], ids=["linear_then_ties", "ties_chain"])
def test_graph_equals_its_merges_run_through_disk(models, tmp_path, run_cli, monkeypatch, graph):
    ref_dir, graph_dir = tmp_path / "ref", tmp_path / "graph"
    ref_dir.mkdir()
    graph_dir.mkdir()
    run_through_disk(run_cli, ref_dir, models, graph, ref_dir / "final")

    monkeypatch.chdir(graph_dir)
    cfg = write_graph(graph_dir, models, graph)
    result = run_cli("merge", cfg, graph_dir / "out", "--no-copy-tokenizer")
    assert result.code == 0, result.stderr
    assert_same_tensors(graph_dir / "out", ref_dir / "final")
    # Nothing but the config and the output: no intermediate folder, no leftover temporary one.
    assert sorted(p.name for p in graph_dir.iterdir()) == ["graph.yaml", "out"]
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and p.name.lstrip(".").startswith(("ab", "abc")) and "ref" not in p.parts]


def test_graph_in_row_chunks_equals_whole(models, tmp_path, run_cli):
    cfg = write_graph(tmp_path, models, TIES_CHAIN)
    whole = run_cli("merge", cfg, tmp_path / "whole", "--no-copy-tokenizer")
    chunked = run_cli("merge", cfg, tmp_path / "chunked", "--no-copy-tokenizer", "--memory-budget", "6Ki")
    dry = run_cli("merge", cfg, tmp_path / "unused", "--memory-budget", "6Ki", "--dry-run")
    assert whole.code == chunked.code == dry.code == 0, whole.stderr + chunked.stderr
    assert " 0 tensor(s) in row chunks" not in dry.stdout  # the budget really forces row chunks
    assert_same_tensors(tmp_path / "chunked", tmp_path / "whole")


def test_memory_estimate_counts_the_inputs_of_a_computed_read(models, tmp_path):
    plan = load_plan(write_graph(tmp_path, models, LINEAR_THEN_TIES), MergeOptions())
    t = next(t for t in plan.tensors if t.name == "model.layers.0.mlp.up_proj.weight")
    # float32 throughout: final ties reads ab, c, base and writes 1 value (4 x 4 bytes); computing ab's element holds
    # its own inputs a and b (2 x 4 bytes) on top of the element already counted.
    assert [plan.models[s.model].ref for s in t.sources] == ["ab", str(models["c"]), str(models["base"])]
    assert t.bytes_per_element_in_flight() == 4 * 4 + 2 * 4


def test_keep_intermediates_writes_named_merges_like_mergekit_multi(models, tmp_path, run_cli):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    run_through_disk(run_cli, ref_dir, models, TIES_CHAIN, ref_dir / "final")
    cfg = write_graph(tmp_path, models, TIES_CHAIN)
    result = run_cli("merge", cfg, tmp_path / "out", "--no-copy-tokenizer", "--keep-intermediates", tmp_path / "kept")
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["ab", "abc"]
    for name in ("ab", "abc"):
        assert_same_tensors(tmp_path / "kept" / name, ref_dir / name)
    assert_same_tensors(tmp_path / "out", ref_dir / "final")


def test_dry_run_lists_the_graph_merges(models, tmp_path, run_cli):
    cfg = write_graph(tmp_path, models, TIES_CHAIN)
    result = run_cli("merge", cfg, tmp_path / "out", "--dry-run")
    assert result.code == 0, result.stderr
    table = result.stdout[result.stdout.index("merge graph"):]
    rows = [line for line in table.splitlines() if line.startswith("│") and line.split("│")[1].strip()]  # long cells wrap
    assert [r.split("│")[1].strip() for r in rows] == ["ab", "abc", "(final)"]
    assert [r.split("│")[2].strip() for r in rows] == ["ties", "task_arithmetic", "linear"]
    assert "computed as read, not written" in rows[0] and not (tmp_path / "out").exists()


def test_unused_named_merge_is_a_warning(models, tmp_path, run_cli):
    graph = LINEAR_THEN_TIES + [("spare", linear("$a", "$b"))]  # after the unnamed final merge
    result = run_cli("merge", write_graph(tmp_path, models, graph), tmp_path / "out", "--dry-run")
    assert result.code == 0 and "merge 'spare' is not an input of the final merge" in result.stderr


@pytest.mark.parametrize(
    "graph, expected",
    [
        ([("x", linear("$y", "$a")), ("y", linear("$x", "$b"))],
         ("cycle (x -> y -> x", "(in merge 'y')")),
        ([("ab", linear("$a", "$b")), (None, linear("abx", "$c"))],
         ("'abx' is neither a merge of this file (ab) nor a model folder (did you mean 'ab'?)", "(in the final merge)")),
        ([("ab", linear("$a")), ("ab", linear("$b"))],
         ("merge name 'ab' is used twice (first at ", "graph.yaml:1 (name)")),
        ([(None, linear("$a")), (None, linear("$b"))],
         ("graph.yaml:5: a second document without 'name'", "only one merge, the final one, may be unnamed")),
        ([("ab", linear("$a")), (None, linear("$ab", "$c"))],
         ("'ab' is both a merge of this file and the folder", "(in the final merge)")),
        ([("ab", linear("$a") + "    parameters: {wieght: 1}\n"), (None, linear("$ab"))],
         ("graph.yaml:5 (models[0].parameters.wieght): unknown parameter 'wieght'", "(in merge 'ab')")),
    ],
    ids=["cycle", "unknown", "duplicate", "two_unnamed", "shadows_folder", "bad_node"],
)
def test_graph_errors_are_one_line_naming_file_and_merge(models, tmp_path, run_cli, monkeypatch, graph, expected):
    monkeypatch.chdir(tmp_path)
    if expected[0].startswith("'ab' is both"):
        (tmp_path / "ab").mkdir()
    result = run_cli("merge", write_graph(tmp_path, models, graph), tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and "graph.yaml:" in lines[0], result.stderr
    assert all(part in lines[0] for part in expected), lines[0]


def test_nan_in_an_intermediate_names_the_merge(models, tmp_path, run_cli):
    from safetensors.torch import save_file

    state = load_state_dict(models["a"])
    state["model.norm.weight"][3] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, bad / "model.safetensors")
    (bad / "config.json").write_bytes((models["a"] / "config.json").read_bytes())  # a folder without one is refused
    graph = [
        ("ab", linear("$bad", "$b", weight="0.5")),
        (None, linear("$ab", "$c", weight="0.5")),
    ]
    cfg = write_graph(tmp_path, models | {"bad": bad}, graph)
    result = run_cli("merge", cfg, tmp_path / "out", "--no-copy-tokenizer")
    lines = result.stderr.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and "merge 'ab' gives NaN/Inf in 'model.norm.weight'" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# -- modules: -----------------------------------------------------------------------------------------------------
def _modules_config(models) -> str:
    return f"""
        merge_method: linear
        modules:
          default:
            slices:
              - sources:
                  - model: {models['a']}
                    layer_range: [0, 2]
                    parameters: {{weight: 0.3}}
                  - model: {models['b']}
                    layer_range: [0, 2]
              - sources:
                  - model: {models['a']}
                    layer_range: [2, 3]
                  - model: {models['b']}
                    layer_range: [2, 3]
                parameters: {{weight: 0.8}}
            parameters:
              weight: [{{filter: mlp, value: 0.9}}]
        parameters:
          weight: 0.1
          normalize: false
    """


def test_modules_parameters_rank_between_slice_and_global(models, tmp_path, run_cli):
    """slice source > output slice > module > global, and a module filter list matching nothing falls through."""
    cfg = write_config(tmp_path, textwrap.dedent(_modules_config(models)))
    result = run_cli("merge", cfg, tmp_path / "out", "--no-copy-tokenizer")
    assert result.code == 0, result.stderr
    a, b, got = load_state_dict(models["a"]), load_state_dict(models["b"]), load_state_dict(tmp_path / "out")

    def weights(name: str) -> tuple[float, float]:
        if name.startswith("model.layers.2.") or name in ("model.norm.weight", "lm_head.weight"):
            return 0.8, 0.8  # the second slice's own parameter (post tensors follow the last slice)
        return 0.3, 0.9 if "mlp" in name else 0.1  # a: its source's; b: the module's filter, else the global

    assert set(got) == set(a)
    for k in a:
        wa, wb = weights(k)
        torch.testing.assert_close(got[k], wa * a[k] + wb * b[k], atol=1e-6, rtol=0)


def test_modules_config_equals_the_same_slices_config(models, tmp_path, run_cli):
    """The module's slices one level up; its filter list, then the global value as the catch-all, as global parameters."""
    a, b = models["a"], models["b"]
    slices = f"""
        merge_method: linear
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 2]
                parameters: {{weight: 0.3}}
              - model: {b}
                layer_range: [0, 2]
          - sources:
              - model: {a}
                layer_range: [2, 3]
              - model: {b}
                layer_range: [2, 3]
            parameters: {{weight: 0.8}}
        parameters:
          weight: [{{filter: mlp, value: 0.9}}, {{value: 0.1}}]
          normalize: false
    """
    outputs = []
    for name, text in (("modules", _modules_config(models)), ("slices", slices)):
        result = run_cli("merge", write_config(tmp_path, textwrap.dedent(text), f"{name}.yaml"), tmp_path / name, "--no-copy-tokenizer")
        assert result.code == 0, result.stderr
        outputs.append(tmp_path / name)
    assert_same_tensors(*outputs)


def test_modules_models_layout_equals_models_config(models, tmp_path, run_cli):
    a, b, base = models["a"], models["b"], models["base"]
    plain = f"""
        merge_method: ties
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.7, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.3, density: 0.8}}
    """
    moduled = f"""
        merge_method: ties
        base_model: {base}
        modules:
          default:
            models:
              - model: {a}
                parameters: {{weight: 0.7, density: 0.5}}
              - model: {b}
                parameters: {{weight: 0.3, density: 0.8}}
    """
    outputs = []
    for name, text in (("plain", plain), ("moduled", moduled)):
        result = run_cli("merge", write_config(tmp_path, textwrap.dedent(text), f"{name}.yaml"), tmp_path / name, "--no-copy-tokenizer")
        assert result.code == 0, result.stderr
        outputs.append(tmp_path / name)
    assert_same_tensors(*outputs)


def test_module_other_than_default_is_one_line_error(models, tmp_path, run_cli):
    cfg = write_config(tmp_path, f"merge_method: linear\nmodules:\n  decoder:\n    models:\n      - model: {models['a']}\n")
    result = run_cli("merge", cfg, tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and "merge.yaml:3 (modules.decoder)" in lines[0] and "'default'" in lines[0]


def test_resume_fingerprint_sees_upstream_inputs_of_a_graph(models, tmp_path):
    """A resumed graph merge must not reuse shards when a model only an upstream merge reads has changed."""
    from mergeedit.io.shard_writer import layout_shards
    from mergeedit.merging.merge import output_entries, plan_fingerprint

    cfg = write_graph(tmp_path, models, LINEAR_THEN_TIES)
    plan = load_plan(cfg, MergeOptions())
    shards = layout_shards(output_entries(plan), 10**9)
    before = plan_fingerprint(plan, shards)
    assert plan_fingerprint(load_plan(cfg, MergeOptions()), shards) == before
    upstream_only = next(models["a"].glob("*.safetensors"))  # `a` is read only by the upstream merge `ab`
    stat = upstream_only.stat()
    import os

    os.utime(upstream_only, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert plan_fingerprint(load_plan(cfg, MergeOptions()), shards) != before
    finally:
        os.utime(upstream_only, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_output_inside_a_folder_only_an_upstream_merge_reads_is_refused(models, tmp_path, run_cli):
    cfg = write_graph(tmp_path, models, LINEAR_THEN_TIES)
    out = models["a"] / "merged"
    result = run_cli("merge", cfg, out)
    assert result.code == 2 and "overlaps the input model folder" in result.stderr and str(models["a"]) in result.stderr
    assert not out.exists()
