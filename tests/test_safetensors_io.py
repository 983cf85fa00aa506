"""The streaming safetensors writer: same format as ``safetensors.torch.save_file``, one tensor in memory at a time.

Checked against safetensors' own readers (``load_file``, ``safe_open``) and transformers'
``from_pretrained``, for every dtype a checkpoint may hold, 0-d and empty tensors, tensors copied
byte for byte from another file (by the kernel and by plain reads) and tensors made on demand.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import struct
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import cosmic_bake.export.safetensors_write as st_io
from cosmic_bake.artifacts import Direction
from cosmic_bake.bake.folder import bake_folder
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export.safetensors_read import dtype_code, list_weights, read_header
from cosmic_bake.export.safetensors_write import (
    DeferredTensor,
    StoredTensor,
    write_index,
    write_safetensors,
    write_shards,
)

ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def odd_tensors() -> dict[str, torch.Tensor]:
    """Every itemsize, odd byte counts (so a careless layout misaligns), a 0-d and empty tensors."""
    g = torch.Generator().manual_seed(0)
    return {
        "half.odd": torch.randn(3, 5, generator=g).half(),  # 30 bytes
        "f32": torch.randn(7, 3, generator=g),
        "bf16": torch.randn(5, 3, generator=g).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (3, 2), generator=g, dtype=torch.int64),
        "scalar.f32": torch.tensor(3.25),
        "scalar.bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 4),
        "empty.bf16": torch.empty(2, 0, dtype=torch.bfloat16),
        "i8": torch.tensor([-3, 1, 2], dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "f64": torch.randn(2, generator=g, dtype=torch.float64),
    }


def raw_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return n, json.loads(fh.read(n))


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


def test_in_memory_tensors_round_trip(tmp_path):
    tensors = odd_tensors()
    path = tmp_path / "out.safetensors"
    write_safetensors(tensors, path, metadata={"format": "pt", "note": "kept"})
    assert_same(load_file(str(path)), tensors)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
        assert set(f.keys()) == set(tensors)
        assert torch.equal(f.get_slice("f32")[2:4], tensors["f32"][2:4])


def test_header_layout_and_alignment(tmp_path):
    """Header padded to 8 bytes; data contiguous, in the given order within an element size, each tensor aligned."""
    tensors = odd_tensors()
    path = tmp_path / "out.safetensors"
    write_safetensors(tensors, path, metadata={"format": "pt"})
    n, header = raw_header(path)
    assert n % 8 == 0 and (8 + n) % 8 == 0
    assert next(iter(header)) == "__metadata__" and header.pop("__metadata__") == {"format": "pt"}
    order = list(header)
    sizes = [ITEMSIZE[header[name]["dtype"]] for name in order]
    assert sizes == sorted(sizes, reverse=True)
    for size in set(sizes):  # stable: the caller's order among tensors of one element size
        same = [name for name in tensors if ITEMSIZE[header[name]["dtype"]] == size]
        assert [name for name in order if ITEMSIZE[header[name]["dtype"]] == size] == same
    offset = 0
    for name in order:
        begin, end = header[name]["data_offsets"]
        assert begin == offset and (8 + n + begin) % ITEMSIZE[header[name]["dtype"]] == 0, name
        assert end - begin == tensors[name].numel() * tensors[name].element_size()
        assert header[name]["shape"] == list(tensors[name].shape)
        offset = end
    assert path.stat().st_size == 8 + n + offset
    meta, infos = read_header(path)  # and our own reader agrees
    assert meta == {"format": "pt"} and [i.name for i in infos] == order


def test_same_bytes_as_save_file_for_one_dtype(tmp_path):
    """With one dtype and names in sorted order (save_file's own order) the file is byte-identical."""
    g = torch.Generator().manual_seed(1)
    tensors = {name: torch.randn(3, 5, generator=g).bfloat16() for name in ("a.weight", "b.bias", "c")}
    tensors["d.scalar"] = torch.tensor(0.5, dtype=torch.bfloat16)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    write_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "plain-reads"])
def test_stored_and_deferred_tensors(tmp_path, monkeypatch, kernel):
    """Stored tensors are copied byte for byte (by the kernel, or by reads where it refuses); deferred ones made."""
    source = odd_tensors()
    save_file(source, str(tmp_path / "src.safetensors"))
    listing = list_weights(tmp_path)
    if not kernel:

        def refuse(*args, **kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
        monkeypatch.setattr(st_io, "CHUNK_BYTES", 7)  # many partial reads, odd sizes
    stored = {name: StoredTensor(tmp_path / info.file, info) for name, info in listing.tensors.items()}
    deferred = {
        f"made.{name}": DeferredTensor(dtype_code(t.dtype), tuple(t.shape), lambda t=t: t.clone() + 1)
        for name, t in source.items()
        if t.dtype.is_floating_point
    }
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    write_safetensors({**stored, **deferred}, out, metadata={"format": "pt"})
    expected = {**source, **{f"made.{n}": t + 1 for n, t in source.items() if t.dtype.is_floating_point}}
    assert_same(load_file(str(out)), expected)


def test_deferred_tensors_are_made_one_at_a_time(tmp_path):
    """Each deferred tensor is made when reached and released before the next is made (peak = one tensor)."""
    alive: list[weakref.ref] = []
    made: list[str] = []

    def maker(name: str):
        def make() -> torch.Tensor:
            gc.collect()
            assert all(ref() is None for ref in alive), "a previous deferred tensor is still alive"
            made.append(name)
            t = torch.full((64, 8), float(len(made)))
            alive.append(weakref.ref(t))
            return t

        return make

    tensors = {f"t{i}": DeferredTensor("F32", (64, 8), maker(f"t{i}")) for i in range(4)}
    write_safetensors(tensors, tmp_path / "out.safetensors")
    assert made == ["t0", "t1", "t2", "t3"]
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert [float(loaded[f"t{i}"][0, 0]) for i in range(4)] == [1.0, 2.0, 3.0, 4.0]


def test_wrong_deferred_tensor_and_bad_metadata_are_refused(tmp_path):
    with pytest.raises(ValueError, match="announced as F32 \\[2, 2\\]"):
        write_safetensors({"x": DeferredTensor("F32", (2, 2), lambda: torch.zeros(2, 3))}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="strings"):
        write_safetensors({"x": torch.zeros(1)}, tmp_path / "b.safetensors", metadata={"format": 1})
    with pytest.raises(ValueError, match="cannot store"):
        write_safetensors({"x": torch.zeros(1, dtype=torch.complex64)}, tmp_path / "c.safetensors")


def test_truncated_source_is_reported(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "src.safetensors"))
    info = list_weights(tmp_path).tensors["w"]
    with open(tmp_path / "src.safetensors", "r+b") as fh:
        fh.truncate(info.begin + 100)
    with pytest.raises(CosmicBakeError, match="ended inside tensor w"):
        write_safetensors({"w": StoredTensor(tmp_path / "src.safetensors", info)}, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()  # no half-written file left behind


def test_shards_and_index(tmp_path):
    a, b = torch.randn(4, 4), torch.randn(3).half()
    shards = {"model-00001-of-00002.safetensors": {"a": a}, "model-00002-of-00002.safetensors": {"b": b}}
    meta = dict.fromkeys(shards, {"format": "pt"})
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert write_shards(shards, meta, tmp_path) == weight_map
    write_index(tmp_path, shards, {"total_size": 1, "total_parameters": 1, "other": "kept"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 64 + 6, "total_parameters": 19, "other": "kept"}
    assert index["weight_map"] == weight_map
    assert_same(load_file(str(tmp_path / "model-00002-of-00002.safetensors")), {"b": b})


def test_full_disk_becomes_a_clear_error(tmp_path):
    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CosmicBakeError, match="no space left"):
        write_shards({"model.safetensors": {"a": torch.zeros(1)}}, {"model.safetensors": {}}, tmp_path, save=full)


def test_baked_bfloat16_shards_load_with_transformers(tiny_model_factory, tmp_path):
    """A bfloat16 sharded, tied checkpoint baked through the writer loads with from_pretrained, bit for bit."""
    source = tiny_model_factory("llama", tied=True, num_layers=4, dtype=torch.bfloat16, shard_size="100KB")
    r = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    direction = Direction(r, torch.zeros(64, dtype=torch.float64), layer=1, position=-1)
    out = tmp_path / "baked"
    report = bake_folder(source, direction, out)
    assert len(report.files) > 1
    written = {k: v for f in report.files for k, v in load_file(str(out / f)).items()}
    assert all(t.dtype == torch.bfloat16 for t in written.values())
    original = {k: v for f in report.files for k, v in load_file(str(source / f)).items()}
    assert torch.equal(written["lm_head.weight"], original["model.embed_tokens.weight"])
    assert torch.equal(written["model.norm.weight"], original["model.norm.weight"])  # copied, untouched
    assert not torch.equal(
        written["model.layers.0.mlp.down_proj.weight"], original["model.layers.0.mlp.down_proj.weight"]
    )
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    state = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
