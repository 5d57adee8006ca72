"""Reading headers and tensors, writing shards: against the reference safetensors library."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergeedit.core.errors import MergeEditError
from mergeedit.core.units import format_size, parse_size
from mergeedit.io.model_source import open_model
from mergeedit.io.safetensors_header import read_header
from mergeedit.io.shard_writer import OutputEntry, ShardWriter, layout_shards
from mergeedit.io.tensor_reader import TensorReader

ALL_DTYPES = [
    torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
]


def _sample(dtype: torch.dtype, shape=(5, 3)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def test_header_and_reads_match_reference_for_every_dtype(tmp_path):
    tensors = {f"t_{str(d).split('.')[-1]}": _sample(d) for d in ALL_DTYPES}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    path = tmp_path / "all.safetensors"
    save_file(tensors, path)
    infos, metadata = read_header(path)
    assert set(infos) == set(tensors)
    with safe_open(path, "pt") as f, TensorReader() as reader:
        for name, expected in tensors.items():
            info = infos[name]
            assert info.shape == tuple(expected.shape)
            assert info.torch_dtype == expected.dtype
            got = reader.read(info)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            ref = f.get_tensor(name)
            assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))  # bit-exact, NaN-safe


def test_row_ranges_read_exactly_those_rows(tmp_path):
    x = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    save_file({"x": x}, tmp_path / "x.safetensors")
    info = read_header(tmp_path / "x.safetensors")[0]["x"]
    with TensorReader() as reader:
        assert torch.equal(reader.read(info, (3, 7)), x[3:7])
        assert reader.bytes_read == 4 * 4 * 4


def _direct_read_file(tmp_path):
    """Tensors above the direct-read threshold, at data offsets that are not block aligned, in several dtypes."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        "head": torch.randn(3, generator=g),  # shifts everything after it off 4096-byte alignment
        "f32": torch.randn(301, 1021, generator=g),
        "bf16": torch.randn(1027, 613, generator=g).to(torch.bfloat16),
        "i8": torch.randint(-100, 100, (2049, 700), generator=g).to(torch.int8),
        "f64": torch.randn(257, 515, generator=g).double(),
    }
    path = tmp_path / "big.safetensors"
    save_file(tensors, path)
    return tensors, read_header(path)[0]


def _garbage_alloc(n: int) -> torch.Tensor:
    return torch.full((n,), 0xAB, dtype=torch.uint8)  # reused pool buffers hold old bytes


@pytest.mark.parametrize("cached_prefix", [0, 5000, 8192])
def test_direct_reads_equal_cached_reads(tmp_path, monkeypatch, cached_prefix):
    """O_DIRECT reads (what a merge of inputs larger than RAM uses) give the same bytes as reads through the cache,
    whole tensors and row ranges, with part of the range already cached (copied from the cache, the rest read direct
    from the aligned position below it) or none of it."""
    from mergeedit.io import tensor_reader

    tensors, infos = _direct_read_file(tmp_path)
    assert any(i.start % tensor_reader.DIRECT_ALIGN for i in infos.values())

    def partly_cached(fd, view, offset):  # as if the page cache held the first `cached_prefix` bytes of the range
        n = min(cached_prefix, len(view))
        got = os.preadv(fd, [view[:n]], offset) if n else 0
        return got

    monkeypatch.setattr(tensor_reader, "_pread_cached", partly_cached)
    with TensorReader(direct=False) as plain, TensorReader() as direct:
        for name, expected in tensors.items():
            for rows in (None, (0, expected.shape[0]), (1, expected.shape[0] - 1)):
                a = plain.read(infos[name], rows, alloc=_garbage_alloc)
                b = direct.read(infos[name], rows, alloc=_garbage_alloc)
                assert a.dtype == b.dtype and a.shape == b.shape
                assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
                assert torch.equal(b, expected[slice(*rows) if rows else slice(None)])
        assert direct.bytes_read == plain.bytes_read
        assert torch.equal(direct.read(infos["bf16"], (2, 900)), tensors["bf16"][2:900])
        if direct._direct_fd(infos["f32"].path) is not None:  # the file system takes O_DIRECT (tmpfs does not)
            assert direct.bytes_read_direct > 0
            assert plain.bytes_read_direct == 0


def _mapped(x, path) -> bool:
    """Whether x's first byte lies in a mapping of `path` (/proc/self/maps); with x None, whether any mapping of it
    remains."""
    import gc

    gc.collect()
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if x is None or lo <= x.data_ptr() < hi:
                return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings from /proc")
def test_reads_meant_to_be_repeated_are_mapped_from_the_page_cache(tmp_path, monkeypatch):
    """The executor marks reads that a later pass repeats: those are views of a file mapping (never direct, never
    copied), with the bytes of a plain read, whole and in row ranges at unaligned offsets, in every dtype; writing
    into one changes a private copy, not the file; small ones are copied through the cache."""
    from mergeedit.io import tensor_reader

    tensors, infos = _direct_read_file(tmp_path)
    monkeypatch.setattr(tensor_reader, "_pread_cached", lambda fd, view, offset: 0)
    with TensorReader() as reader:
        reader.keep_in_cache = True
        for name, expected in tensors.items():
            for rows in (None, (1, expected.shape[0] - 1)):
                got = reader.read(infos[name], rows, alloc=_garbage_alloc)
                assert torch.equal(got, expected[slice(*rows) if rows else slice(None)])
                assert _mapped(got, infos[name].path) == (got.nbytes >= tensor_reader.MAP_MIN_BYTES)
        assert reader.bytes_read_direct == 0
        mapped = reader.read(infos["f32"])
        mapped.zero_()  # copy-on-write: the file keeps its bytes
        assert torch.equal(reader.read(infos["f32"]), tensors["f32"])
        assert _mapped(mapped, infos["f32"].path)
        del mapped, got
        assert not _mapped(None, infos["f32"].path)  # unmapped with its last view
        small = reader.read(infos["head"])  # below MAP_MIN_BYTES: copied through the cache
        assert torch.equal(small, tensors["head"]) and not _mapped(small, infos["head"].path)
        reader.keep_in_cache = False
        assert torch.equal(reader.read(infos["f32"], (5, 300)), tensors["f32"][5:300])
        assert reader.bytes_read_direct in (0, 295 * 1021 * 4)  # 0 where the file system refuses O_DIRECT


def test_the_last_mapped_read_drops_its_range_from_the_page_cache(tmp_path):
    """A chunk's last read (drop_after) leaves the page cache once its last view is freed; earlier reads keep it."""
    from mergeedit.io import tensor_reader

    tensors, infos = _direct_read_file(tmp_path)
    info = infos["f32"]
    fd = os.open(info.path, os.O_RDONLY)
    cached = lambda: tensor_reader._pread_cached(fd, memoryview(bytearray(info.nbytes)), info.start)  # noqa: E731
    try:
        os.fsync(fd)
        tensor_reader._drop_from_cache(str(info.path), 0, 0)
        if cached() == info.nbytes:
            pytest.skip("this file system keeps pages that fadvise asked to drop (tmpfs)")
        with TensorReader() as reader:
            reader.keep_in_cache = True
            kept = reader.read(info)
            assert torch.equal(kept, tensors["f32"])
            del kept
            assert cached() == info.nbytes  # a statistics pass's read stays cached for the merge pass
            reader.drop_after = True
            last = reader.read(info)
            assert torch.equal(last, tensors["f32"])
            assert cached() == info.nbytes  # still mapped: still cached
            del last
            assert cached() < info.nbytes
    finally:
        os.close(fd)


def test_read_settings_belong_to_the_reading_thread():
    """The statistics thread's reads and the reader thread's run at once: one's settings must not steer the other's."""
    import threading

    with TensorReader() as reader:
        seen = {}
        with reader.mode(keep_in_cache=True, drop_after=True):
            other = threading.Thread(target=lambda: seen.update(keep=reader.keep_in_cache, drop=reader.drop_after))
            other.start()
            other.join()
            assert reader.keep_in_cache and reader.drop_after
        assert seen == {"keep": False, "drop": False}
        assert not reader.keep_in_cache and not reader.drop_after  # restored after the block


def test_a_mapped_read_past_the_end_of_a_truncated_file_is_an_error(tmp_path):
    """Mapping bytes the file no longer has would kill the process (SIGBUS) on first touch: it is refused first."""
    tensors, infos = _direct_read_file(tmp_path)
    info = infos["f64"]
    with open(info.path, "r+b") as f:
        f.truncate(info.end - 8)
    with TensorReader() as reader:
        reader.keep_in_cache = True
        with pytest.raises(OSError, match="unexpected end of file.*'f64'"):
            reader.read(info)


def test_the_page_cache_probe_reads_cached_bytes(tmp_path):
    """RWF_NOWAIT finds a file that was just written in the cache: nothing needs a direct read."""
    from mergeedit.io import tensor_reader

    tensors, infos = _direct_read_file(tmp_path)
    info = infos["f32"]
    view = memoryview(bytearray(info.nbytes))
    fd = os.open(info.path, os.O_RDONLY)
    try:
        got = tensor_reader._pread_cached(fd, view, info.start)
    finally:
        os.close(fd)
    if not hasattr(os, "RWF_NOWAIT"):
        assert got == 0
        return
    assert got in (0, info.nbytes)  # 0 only where non-blocking reads are unsupported
    if got:
        assert torch.equal(torch.frombuffer(view, dtype=torch.float32).reshape(tensors["f32"].shape), tensors["f32"])


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header,data,reason",
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
        ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ],
)
def test_bad_headers_are_named_with_the_reason(tmp_path, header, data, reason):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(MergeEditError, match=reason) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_garbage_and_short_files_are_refused(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(MergeEditError, match="fewer than the 8-byte"):
        read_header(short)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(MergeEditError, match="not JSON"):
        read_header(garbage)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(MergeEditError, match="does not fit"):
        read_header(huge)


def test_shard_layout_follows_hugging_face_names():
    entries = [OutputEntry(f"t{i}", torch.float32, (10,)) for i in range(5)]  # 40 bytes each
    single = layout_shards(entries, 10**6)
    assert [s.filename for s in single] == ["model.safetensors"]
    multi = layout_shards(entries, 100)
    assert [s.filename for s in multi] == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert [len(s.entries) for s in multi] == [2, 2, 1]
    big = layout_shards([OutputEntry("huge", torch.float32, (100,))] + entries[:1], 100)
    assert [len(s.entries) for s in big] == [1, 1]  # a tensor larger than the shard size gets its own shard


def test_streamed_shards_load_with_reference_library(tmp_path):
    tensors = {"a": torch.randn(6, 4), "b": torch.randn(3).to(torch.bfloat16), "c": torch.arange(8, dtype=torch.int64), "d": torch.randn(0, 2)}
    entries = [OutputEntry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    shards = layout_shards(entries, 100)
    writer = ShardWriter(tmp_path, shards)
    writer.write("a", tensors["a"][:2])  # row chunks arrive in order
    writer.write("a", tensors["a"][2:])
    for name in ("b", "c", "d"):
        writer.write(name, tensors[name])
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for shard in shards:
        with safe_open(tmp_path / shard.filename, "pt") as f:
            assert f.metadata() == {"format": "pt"}
        loaded.update(load_file(tmp_path / shard.filename))
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)


def _write_shards(folder, tensors: dict, direct: bool, stage: int = 4096):
    entries = [OutputEntry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    shards = layout_shards(entries, 30_000)
    writer = ShardWriter(folder, shards, direct=direct, stage_bytes=stage)
    for name, t in tensors.items():
        half = t.shape[0] // 2
        writer.write(name, t[:half])
        writer.write(name, t[half:])
    writer.finish()
    return shards, writer


def test_direct_shard_writes_give_the_buffered_bytes(tmp_path, monkeypatch):
    """Shards written with O_DIRECT through a staging buffer (shrunk to two pages, so tensors straddle many flushes
    and every shard ends in an unaligned tail) hold the bytes of plain buffered writes; the streamed sha256 matches
    the file."""
    import hashlib

    from mergeedit.io import shard_writer

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(37 + 11 * i, 29, generator=g) for i in range(6)}
    tensors["bf"] = torch.randn(1001, 3, generator=g).to(torch.bfloat16)
    (tmp_path / "direct").mkdir()
    (tmp_path / "plain").mkdir()
    opened = []
    real_open = os.open
    monkeypatch.setattr(shard_writer.os, "open", lambda path, flags, *a: (opened.append(flags), real_open(path, flags, *a))[1])
    shards, direct = _write_shards(tmp_path / "direct", tensors, True, stage=2 * shard_writer.DIRECT_ALIGN)
    _, plain = _write_shards(tmp_path / "plain", tensors, False)
    assert len(shards) > 1
    for shard in shards:
        a, b = (tmp_path / "direct" / shard.filename).read_bytes(), (tmp_path / "plain" / shard.filename).read_bytes()
        assert a == b and len(a) % shard_writer.DIRECT_ALIGN  # an unaligned tail
        assert direct.digests[shard.filename] == hashlib.sha256(a).hexdigest() == plain.digests[shard.filename]
    loaded = {}
    for shard in shards:
        loaded.update(load_file(tmp_path / "direct" / shard.filename))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert any(f & os.O_DIRECT for f in opened) and not all(f & os.O_DIRECT for f in opened)
    # the staging buffer a merge gets: 1/32 of its budget, in whole pages, within 1 MiB .. 32 MiB
    assert shard_writer.stage_size(1 << 30) == 32 << 20 and shard_writer.stage_size(64 << 20) == 2 << 20
    assert shard_writer.stage_size(1 << 20) == 1 << 20 and shard_writer.stage_size(300_000_000) == 9371648


def test_direct_shard_writes_fall_back_when_the_file_system_refuses_them(tmp_path, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the writes (EINVAL) gets the same bytes, written buffered."""
    import errno
    import fcntl

    from mergeedit.io import shard_writer

    real_write = os.write

    def refusing(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(shard_writer.os, "write", refusing)
    tensors = {"a": torch.randn(300, 7), "b": torch.arange(5000, dtype=torch.int64)}
    shards, _ = _write_shards(tmp_path, tensors, True)
    loaded = {}
    for shard in shards:
        loaded.update(load_file(tmp_path / shard.filename))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_writer_refuses_out_of_order_tensors(tmp_path):
    shards = layout_shards([OutputEntry("a", torch.float32, (2,)), OutputEntry("b", torch.float32, (2,))], 10**6)
    writer = ShardWriter(tmp_path, shards)
    with pytest.raises(RuntimeError, match="expected 'a'"):
        writer.write("b", torch.zeros(2))


def test_model_folder_index_single_file_and_pickle_refusal(tmp_path, models):
    model = open_model(str(models["a"]))
    assert len(model.files) == 3 and "lm_head.weight" in model.tensors
    assert model.config["num_hidden_layers"] == 3
    single = tmp_path / "one.safetensors"
    save_file({"w": torch.ones(2)}, single)
    assert list(open_model(str(single)).tensors) == ["w"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.ones(2)}, pickled / "pytorch_model.bin")
    with pytest.raises(MergeEditError, match="pickled"):
        open_model(str(pickled))


def test_hub_id_offline_and_absent_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MergeEditError, match="not in the Hugging Face cache") as err:
        open_model("some-org/some-model@main")
    assert "some-org/some-model@main" in str(err.value)


def test_hub_id_resolves_from_the_cache(tmp_path, monkeypatch, models):
    """A cached snapshot (the layout huggingface_hub writes) resolves offline, with no network."""
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in models["a"].iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model = open_model("org/tiny")
    assert model.path == snapshot and len(model.tensors) == len(open_model(str(models["a"])).tensors)


def test_sizes_parse_like_hugging_face():
    assert parse_size("5G") == 5 * 10**9
    assert parse_size("512M") == 512 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("100") == 100
    with pytest.raises(MergeEditError, match="--out-shard-size"):
        parse_size("lots", "--out-shard-size")
    assert format_size(1536) == "1.5 KiB"
