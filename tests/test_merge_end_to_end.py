"""Whole merges through the library and the CLI: outputs load in transformers and equal in-memory reference merges."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import SHAPE, ties_reference, write_config

from mergeedit.merging.merge import MergeOptions, load_plan, write_merge
from mergeedit.models.toy import load_state_dict


def _logits(folder_or_state, reference_folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokens = torch.tensor([[1, 5, 9, 33, 70, 2]])
    if isinstance(folder_or_state, Path):
        model = AutoModelForCausalLM.from_pretrained(folder_or_state)
    else:
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(reference_folder))
        model.load_state_dict(folder_or_state, strict=False)
        model.tie_weights()
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def test_ties_merge_loads_in_transformers_with_reference_logits(tmp_path, models):
    cfg = write_config(tmp_path, textwrap.dedent(f"""
        merge_method: ties
        base_model: {models['base']}
        models:
          - model: {models['a']}
            parameters: {{weight: 0.7, density: 0.4}}
          - model: {models['b']}
            parameters: {{weight: 0.3, density: 0.8}}
    """))
    out = tmp_path / "merged"
    options = MergeOptions(out_shard_size=40_000)
    report = write_merge(load_plan(cfg, options), out, options)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert report.bytes_written == sum(p.stat().st_size for p in out.glob("*.safetensors"))

    base, a, b = (load_state_dict(models[k]) for k in ("base", "a", "b"))
    expected = {k: ties_reference(base[k], [a[k], b[k]], [0.7, 0.3], [0.4, 0.8]) for k in base}
    merged = load_state_dict(out)
    assert set(merged) == set(expected)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(out, out), _logits(expected, models["base"]), atol=1e-5, rtol=0)


def test_output_folder_contents(tmp_path, models, run_cli):
    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['base']}\n    parameters: {{weight: 1}}\n  - model: {models['a']}\n    parameters: {{weight: 3}}\n")
    out = tmp_path / "lin"
    result = run_cli("merge", cfg, out, "--dtype", "bfloat16")
    assert result.code == 0, result.stderr
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json", "mergekit_config.yml"} <= files
    assert "model.safetensors.index.json" not in files  # one shard: no index, as transformers writes it
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["num_hidden_layers"] == SHAPE.layers
    base, a = load_state_dict(models["base"]), load_state_dict(models["a"])
    merged = load_state_dict(out)
    for k in base:
        assert merged[k].dtype == torch.bfloat16
        torch.testing.assert_close(merged[k], ((base[k] + 3 * a[k]) / 4).to(torch.bfloat16), atol=0, rtol=0)
    assert not [p for p in tmp_path.iterdir() if ".mergeedit-tmp-" in p.name]


def _dare_config(tmp_path, models) -> Path:
    return write_config(tmp_path, f"""
merge_method: dare_ties
base_model: {models['base']}
models:
  - model: {models['a']}
    parameters: {{weight: 0.5, density: 0.3}}
  - model: {models['b']}
    parameters: {{weight: 0.5, density: 0.6}}
""")


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors*"))}


def test_same_seed_same_bytes_and_budget_does_not_change_results(tmp_path, models, run_cli):
    cfg = _dare_config(tmp_path, models)
    assert run_cli("merge", cfg, tmp_path / "s1", "--random-seed", "7").code == 0
    assert run_cli("merge", cfg, tmp_path / "s2", "--random-seed", "7").code == 0
    assert run_cli("merge", cfg, tmp_path / "s3", "--random-seed", "8").code == 0
    # a 20 KB budget cuts every matrix into row chunks: statistics passes + chunked merge must give the same bytes
    assert run_cli("merge", cfg, tmp_path / "s4", "--random-seed", "7", "--memory-budget", "20K").code == 0
    assert _bytes(tmp_path / "s1") == _bytes(tmp_path / "s2") == _bytes(tmp_path / "s4")
    assert _bytes(tmp_path / "s1") != _bytes(tmp_path / "s3")


def _ties_rescale_config(tmp_path, models) -> Path:
    """Three fine-tunes, a weight gradient, three densities and L1 rescale: every part of TIES' statistics at work."""
    return write_config(tmp_path, f"""
merge_method: ties
base_model: {models['base']}
models:
  - model: {models['a']}
    parameters: {{weight: [0.2, 0.9], density: 0.3}}
  - model: {models['b']}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {models['c']}
    parameters: {{weight: 0.5, density: 0.9}}
parameters: {{rescale: true}}
""")


def test_chunked_ties_equals_whole_ties(tmp_path, models, run_cli):
    cfg = _ties_rescale_config(tmp_path, models)
    assert run_cli("merge", cfg, tmp_path / "whole").code == 0
    result = run_cli("merge", cfg, tmp_path / "chunked", "--memory-budget", "10K", "--dry-run")
    assert "row chunks" in result.stdout and not (tmp_path / "chunked").exists()
    assert run_cli("merge", cfg, tmp_path / "chunked", "--memory-budget", "10K").code == 0
    assert _bytes(tmp_path / "whole") == _bytes(tmp_path / "chunked")


@pytest.mark.parametrize("guess", ["right", "wrong"])
def test_sampled_band_gives_the_radix_bytes_and_skips_a_pass(tmp_path, models, monkeypatch, guess):
    """TIES thresholds settled from a sampled band (forced on for these tiny tensors) give byte-identical merges to the
    two radix passes, whole and in row chunks; a chunked tensor whose band settles skips the low pass's reads, and a
    band guessed wrong falls back to the radix passes (extra in-memory passes for a whole tensor)."""
    from mergeedit.merging.methods import selection

    cfg = _ties_rescale_config(tmp_path, models)

    def merge(name: str, budget: int):
        opts = MergeOptions(memory_budget=budget, fsync=False)
        return write_merge(load_plan(cfg, opts), tmp_path / name, opts)

    monkeypatch.setattr(selection, "BAND_MIN", 1 << 40)
    radix_whole, radix_chunked = merge("radix", 1 << 30), merge("radix-chunked", 10_000)
    monkeypatch.setattr(selection, "BAND_MIN", 1)
    monkeypatch.setattr(selection, "BAND_SAMPLE_MIN", 8)
    if guess == "wrong":  # a band of the smallest denormal only: it never holds the k-th largest of these deltas
        monkeypatch.setattr(selection, "guess_band", lambda sample, k, n, z=0: (1, 1))
    band_whole, band_chunked = merge("band", 1 << 30), merge("band-chunked", 10_000)
    assert radix_chunked.chunked_tensors > 0
    expected = _bytes(tmp_path / "radix")
    assert _bytes(tmp_path / "radix-chunked") == expected
    assert _bytes(tmp_path / "band") == expected
    assert _bytes(tmp_path / "band-chunked") == expected
    assert band_whole.bytes_read == radix_whole.bytes_read
    # a settled band skips the low pass's reads (a few may be read ahead, then dropped); a missed band costs one more
    # pass than the radix plan, read by the statistics thread itself
    assert band_chunked.bytes_read < radix_chunked.bytes_read if guess == "right" else band_chunked.bytes_read > radix_chunked.bytes_read


def test_chunks_read_twice_are_mapped_and_leave_the_cache_only_when_inputs_exceed_it(tmp_path, models, monkeypatch):
    """Row chunks that a statistics pass and the merge pass both read are file mappings (forced on for these tiny
    tensors), with the bytes of a whole merge; the merge pass's mappings drop their pages from the page cache only when
    the inputs exceed half of RAM (pretended here), so smaller inputs stay cached for the next merge."""
    from mergeedit.io import tensor_reader
    from mergeedit.merging import executor

    cfg = _ties_rescale_config(tmp_path, models)
    monkeypatch.setattr(tensor_reader, "MAP_MIN_BYTES", 1)
    mapped = []
    real_map = tensor_reader.TensorReader._map
    monkeypatch.setattr(tensor_reader.TensorReader, "_map", lambda self, *a: (mapped.append(self.drop_after), real_map(self, *a))[1])

    def merge(name: str, budget: int):
        opts = MergeOptions(memory_budget=budget, fsync=False)
        return write_merge(load_plan(cfg, opts), tmp_path / name, opts)

    merge("whole", 1 << 30)
    assert mapped == []  # whole tensors are read once: direct reads
    assert merge("chunked", 10_000).chunked_tensors > 0
    assert mapped and not any(mapped)
    assert _bytes(tmp_path / "chunked") == _bytes(tmp_path / "whole")
    mapped.clear()
    monkeypatch.setattr(executor, "total_ram", lambda: 1024)
    merge("chunked-big", 10_000)
    assert any(mapped) and not all(mapped)  # merge-pass reads drop their range; statistics-pass reads keep it
    assert _bytes(tmp_path / "chunked-big") == _bytes(tmp_path / "whole")


def test_passthrough_slices_stack_layers(tmp_path, models, run_cli):
    cfg = write_config(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: {models['a']}, layer_range: [0, 2]}}]
  - sources: [{{model: {models['b']}, layer_range: [1, 3]}}]
""")
    out = tmp_path / "stack"
    assert run_cli("merge", cfg, out).code == 0
    a, b, merged = load_state_dict(models["a"]), load_state_dict(models["b"]), load_state_dict(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.3.self_attn.q_proj.weight"], b["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])


def test_tied_embeddings_and_mixed_dtypes_with_explicit_dtype(tmp_path, models, run_cli):
    cfg = write_config(tmp_path, f"""
merge_method: task_arithmetic
base_model: {models['tied_base']}
models:
  - model: {models['tied_a']}
    parameters: {{weight: 0.5}}
parameters: {{lambda: 2.0}}
""")
    out = tmp_path / "tied"
    assert run_cli("merge", cfg, out).code == 0
    base, a, merged = load_state_dict(models["tied_base"]), load_state_dict(models["tied_a"]), load_state_dict(out)
    assert "lm_head.weight" not in merged
    for k in base:
        torch.testing.assert_close(merged[k], base[k] + 2.0 * 0.5 * (a[k] - base[k]), atol=1e-6, rtol=0)
    mixed = write_config(tmp_path, f"""
merge_method: linear
dtype: float32
models:
  - model: {models['a']}
    parameters: {{weight: 1}}
  - model: {models['bf16']}
    parameters: {{weight: 1}}
""", "mixed.yaml")
    assert run_cli("merge", mixed, tmp_path / "mixed").code == 0
    a, h, merged = load_state_dict(models["a"]), load_state_dict(models["bf16"]), load_state_dict(tmp_path / "mixed")
    k = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(merged[k], (a[k] + h[k].float()) / 2, atol=1e-7, rtol=0)


def test_overwrite_replaces_only_when_asked(tmp_path, models, run_cli):
    cfg = write_config(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {models['a']}\n")
    out = tmp_path / "o"
    assert run_cli("merge", cfg, out).code == 0
    (out / "marker").write_text("old")
    refused = run_cli("merge", cfg, out)
    assert refused.code == 2 and "--overwrite" in refused.stderr and (out / "marker").exists()
    # A file mergeedit did not write: --overwrite refuses to delete it (issue 15); without it, the folder is replaced.
    foreign = run_cli("merge", cfg, out, "--overwrite")
    assert foreign.code == 2 and "marker" in foreign.stderr and (out / "marker").read_text() == "old"
    (out / "marker").unlink()
    (out / "model.safetensors").touch()  # same name, new mtime: still the folder mergeedit wrote
    assert run_cli("merge", cfg, out, "--overwrite").code == 0
    assert not (out / "marker").exists() and (out / "model.safetensors").exists()


def test_interrupted_merge_leaves_nothing(tmp_path, models, monkeypatch):
    cfg = write_config(tmp_path, f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1, density: 0.5}}\n")
    from mergeedit.io import shard_writer

    original = shard_writer.ShardWriter.write
    calls = {"n": 0}

    def flaky(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, name, tensor)

    monkeypatch.setattr(shard_writer.ShardWriter, "write", flaky)
    out = tmp_path / "never"
    options = MergeOptions()
    with pytest.raises(KeyboardInterrupt):
        write_merge(load_plan(cfg, options), out, options)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merge.yaml"]


_SLOW_MERGE = """
import sys, time
from pathlib import Path
from mergeedit.io import shard_writer
original = shard_writer.ShardWriter.write
def slow(self, name, tensor):
    time.sleep(0.05)
    return original(self, name, tensor)
shard_writer.ShardWriter.write = slow
sys.argv = ["mergeedit", "merge", sys.argv[1], sys.argv[2]]
from mergeedit.cli import main
main()
"""


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_killed_merge_never_leaves_a_partial_output(tmp_path, models, signal_name):
    import signal

    cfg = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n  - model: {models['b']}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, str(cfg), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not [p for p in tmp_path.iterdir() if ".mergeedit-tmp-" in p.name] and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(proc.pid, getattr(signal, signal_name))
    proc.wait(timeout=60)
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if ".mergeedit-tmp-" in p.name]
    if signal_name == "SIGTERM":  # a catchable signal cleans up its temporary folder too
        assert proc.returncode == 143 and not leftovers  # the shell convention for SIGTERM (issue 15)
    else:  # SIGKILL cannot be caught; the next merge to the same folder removes the leftover
        assert leftovers
        from mergeedit.io.output_dir import remove_stale_siblings

        remove_stale_siblings(out)
        assert not [p for p in tmp_path.iterdir() if ".mergeedit-tmp-" in p.name]


def test_all_finite_is_exact_even_when_the_sum_overflows():
    import torch

    from mergeedit.merging.chunks import all_finite

    big = torch.full((1000,), 6.0e4, dtype=torch.float16)  # finite, but its sum overflows float16 (and not float32)
    assert all_finite(big)
    huge = torch.full((10,), 3.0e38)  # finite float32 whose float32 sum is inf: falls back to the element check
    assert all_finite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(300, dtype=torch.bfloat16)
        x[123] = bad
        assert not all_finite(x)
    assert all_finite(torch.zeros(0))


def test_merge_leaves_the_callers_thread_count_alone(tmp_path, models):
    """The executor runs its math on all cores but one (the reader and writer need one; halved when a statistics
    thread computes too); a recipe run trains in the same process after merging, so the caller's torch thread count
    must come back unchanged."""
    from mergeedit.merging.executor import math_threads

    cfg = _dare_config(tmp_path, models)
    before = torch.get_num_threads()
    seen = []
    original = torch.set_num_threads
    try:
        torch.set_num_threads = lambda n: (seen.append(n), original(n))[1]
        options = MergeOptions(memory_budget=1 << 20)
        write_merge(load_plan(cfg, options), tmp_path / "out", options)
    finally:
        torch.set_num_threads = original
    assert seen == [math_threads(with_statistics=True), before]  # dare_ties with rescale gathers L1 norms
    assert torch.get_num_threads() == before
    cores = len(os.sched_getaffinity(0))
    assert 1 <= math_threads() < max(2, cores)
    assert math_threads(with_statistics=True) == max(1, (cores - 1) // 2)


def test_buffer_pool_serves_close_sizes_and_evicts_the_oldest():
    """Row chunks of different tensors differ by a few percent: a free buffer up to 1/8 larger serves a request (its
    first bytes); when full, the pool drops its oldest buffers, not the newest; small buffers are left to malloc."""
    from mergeedit.merging.buffers import BufferPool

    pool = BufferPool(cap=100, smallest=10)
    a, b = torch.empty(40, dtype=torch.uint8), torch.empty(50, dtype=torch.uint8)
    pool.give([a, b])
    assert pool.free_bytes == 90
    got = pool.take(45)  # 50 is within 45 + 45 // 8
    assert got.numel() == 45 and got.data_ptr() == b.data_ptr()
    fresh = pool.take(30)  # 40 is more than 1/8 larger: a new buffer
    assert fresh.data_ptr() != a.data_ptr() and pool.free_bytes == 40
    pool.give([torch.empty(60, dtype=torch.uint8)])  # 100: full
    pool.give([torch.empty(30, dtype=torch.uint8)])  # 130 > 100: the oldest (a) goes
    assert pool.free_bytes == 90
    assert pool.take(40).data_ptr() != a.data_ptr()  # a was evicted; 60 and 30 do not fit 40
    assert pool.take(5).numel() == 5  # below `smallest`: never pooled
    before = pool.free_bytes
    pool.give([torch.empty(5, dtype=torch.uint8), torch.empty(500, dtype=torch.uint8)])  # too small / larger than the pool
    assert pool.free_bytes == before


def test_buffer_pool_also_fills_the_unused_in_flight_budget():
    """Free buffers may occupy in-flight room nobody holds; a fresh allocation (whose bytes the budget has just
    counted) evicts them, so held plus free bytes never pass the budget."""
    from mergeedit.merging.buffers import BufferPool

    room = {"free": 200}
    pool = BufferPool(cap=50, smallest=10, room=lambda: room["free"])
    bufs = [torch.empty(100, dtype=torch.uint8) for _ in range(3)]
    pool.give(bufs[:2])
    assert pool.free_bytes == 200  # beyond the fixed share of 50: the in-flight budget has room
    room["free"] = 80  # a read acquired 120 bytes of budget and allocates them fresh (no buffer fits 40)
    assert pool.take(40).numel() == 40
    assert pool.free_bytes == 100  # the oldest buffer went: 100 free <= 50 + 80
    room["free"] = 0
    pool.give([bufs[2]])
    assert pool.free_bytes == 0  # a buffer bigger than the fixed share is not kept without room
