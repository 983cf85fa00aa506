"""Safetensors checkpoints: stream shard files and their index out (the format: :mod:`.safetensors_read`).

Writing: :func:`write_safetensors` streams a file out. ``safetensors.torch.save_file`` needs a
whole shard in memory and took 3-7.5 s for a 2.4 GB shard that a plain write puts out in 0.8 s.
Here the header is computed from dtypes and shapes alone, then each tensor is written in turn:
a tensor in memory; a :class:`DeferredTensor`, made (read and edited) only when its turn comes
and dropped once written; or a :class:`StoredTensor`, whose bytes are copied from its source file
by the kernel (``os.copy_file_range``) or in 16 MiB reads, never becoming a torch tensor. Peak
memory is about the largest deferred tensor.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export.safetensors_read import DTYPES, INDEX_FILE, TensorInfo, dtype_code, read_tensor
from cosmic_bake.outputs import write_json

CHUNK_BYTES = 16 * 2**20  # plain reads and writes move at most this much at a time
_KERNEL_COPY_BYTES = 2**30  # one os.copy_file_range call
# copy_file_range cannot serve these files (other filesystem, old kernel, sandbox): use plain reads
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM}


# --------------------------------------------------------------------------------------------
# Reading headers and tensors


# --------------------------------------------------------------------------------------------
# Shard layout


# --------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class StoredTensor:
    """A tensor's bytes in an existing safetensors file, to be written unchanged (copied, not loaded)."""

    path: Path
    info: TensorInfo


@dataclass(frozen=True)
class DeferredTensor:
    """A tensor made by ``make()`` only when the writer reaches it; its dtype code and shape are known before."""

    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor] = field(repr=False)


TensorSource = torch.Tensor | StoredTensor | DeferredTensor


def describe(source: TensorSource) -> tuple[str, tuple[int, ...]]:
    """Dtype code and shape of a tensor to write, without making or reading it."""
    if isinstance(source, torch.Tensor):
        return dtype_code(source.dtype), tuple(source.shape)
    if isinstance(source, StoredTensor):
        return source.info.dtype, source.info.shape
    if isinstance(source, DeferredTensor):
        if source.dtype not in DTYPES:
            raise ValueError(f"unknown safetensors dtype code {source.dtype!r}")
        return source.dtype, tuple(int(s) for s in source.shape)
    raise TypeError(f"cannot write a {type(source).__name__} as a tensor")


def make_tensor(source: TensorSource) -> torch.Tensor:
    """The tensor a source stands for: read from its file, made (an edit), or the tensor itself."""
    if isinstance(source, StoredTensor):
        with open(source.path, "rb") as fh:
            return read_tensor(fh, source.info)
    return source.make() if isinstance(source, DeferredTensor) else source


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nbytes(code: str, shape: tuple[int, ...]) -> int:
    return _numel(shape) * DTYPES[code].itemsize


def safetensors_header(specs: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    """The bytes before the data: length prefix and JSON header for ``(name, dtype code, shape)`` in data order.

    ``metadata`` becomes ``__metadata__`` (string values only, as safetensors requires); the JSON
    is padded with spaces to a multiple of 8 bytes, so the data starts 8-byte aligned.
    """
    header: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, code, shape in specs:
        if name == "__metadata__" or name in header:
            raise ValueError(f"tensor name {name!r} is reserved or repeated")
        end = offset + _nbytes(code, shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    tensors: Mapping[str, TensorSource], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` to the safetensors file ``path``, streaming one tensor at a time.

    Tensors go in the given order, stably sorted by decreasing element size (as ``save_file``
    sorts them), so every tensor starts at a multiple of its element size; for a shard of one
    dtype that is exactly the given order. The file loads with ``safe_open`` and ``load_file``.
    """
    if sys.byteorder != "little":
        raise RuntimeError("writing safetensors needs a little-endian machine")
    specs = [(name, *describe(source)) for name, source in tensors.items()]
    specs.sort(key=lambda spec: -DTYPES[spec[1]].itemsize)
    header = safetensors_header(specs, metadata)
    try:
        with open(path, "wb", buffering=0) as out:
            _write_all(out, memoryview(header))
            _write_data(out, specs, tensors)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)  # no half-written file that looks like a checkpoint
        raise


def _write_data(
    out: BinaryIO, specs: list[tuple[str, str, tuple[int, ...]]], tensors: Mapping[str, TensorSource]
) -> None:
    """Each tensor's bytes in ``specs`` order; each source file opened once, each deferred tensor freed once written."""
    copier = _ByteCopier()
    with contextlib.ExitStack() as stack:
        sources: dict[Path, BinaryIO] = {}
        for name, code, shape in specs:
            source = tensors[name]
            if isinstance(source, StoredTensor):
                if source.path not in sources:
                    sources[source.path] = stack.enter_context(open(source.path, "rb", buffering=0))
                copier.copy(sources[source.path], out, source.info)
                continue
            tensor = source.make() if isinstance(source, DeferredTensor) else source
            if (dtype_code(tensor.dtype), tuple(tensor.shape)) != (code, shape):
                made = f"{dtype_code(tensor.dtype)} {list(tensor.shape)}"
                raise ValueError(f"tensor {name} is {made}, announced as {code} {list(shape)}")
            _write_all(out, _tensor_bytes(tensor))
            del tensor  # let a deferred tensor go before the next one is made


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor, in C order (no copy when it is already a contiguous CPU tensor)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # reshape: a 0-d tensor cannot be re-viewed
    return memoryview(flat.view(torch.uint8).numpy())  # uint8 view: numpy has no bfloat16 / float8


def _write_all(out: BinaryIO, data: memoryview) -> None:
    """Write every byte (a raw file may take fewer than asked), at most CHUNK_BYTES per call."""
    while len(data):
        written = out.write(data[:CHUNK_BYTES])
        data = data[written:]


class _ByteCopier:
    """Copies a stored tensor's byte range to the output's current position.

    By the kernel (``os.copy_file_range``: no trip through user memory) while it works; once a
    filesystem refuses it, by plain reads into one reused CHUNK_BYTES buffer.
    """

    def __init__(self) -> None:
        self.kernel = hasattr(os, "copy_file_range")
        self._buffer: memoryview | None = None

    def copy(self, src: BinaryIO, out: BinaryIO, info: TensorInfo) -> None:
        done = self._kernel_copy(src, out, info.begin, info.nbytes) if self.kernel else 0
        if done == info.nbytes:
            return
        if self._buffer is None:
            self._buffer = memoryview(bytearray(CHUNK_BYTES))
        src.seek(info.begin + done)
        while done < info.nbytes:
            n = src.readinto(self._buffer[: min(CHUNK_BYTES, info.nbytes - done)])
            if not n:
                raise CosmicBakeError(f"{info.file} ended inside tensor {info.name}", "re-download the model")
            _write_all(out, self._buffer[:n])
            done += n

    def _kernel_copy(self, src: BinaryIO, out: BinaryIO, begin: int, nbytes: int) -> int:
        """Bytes copied by the kernel; fewer than ``nbytes`` when it stops (the rest goes by reads)."""
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(src.fileno(), out.fileno(), min(nbytes - done, _KERNEL_COPY_BYTES), begin + done)
                if n == 0:  # source ended early, or a filesystem that copies nothing: reads will tell
                    break
                done += n
        except OSError as err:
            if err.errno not in _NO_KERNEL_COPY:
                raise
            self.kernel = False
        return done


def write_shards(
    shards: Mapping[str, Mapping[str, TensorSource]],
    metadata: Mapping[str, Mapping[str, str]],
    out: Path,
    *,
    save: Callable[..., None] = write_safetensors,
) -> dict[str, str]:
    """Write every shard file into ``out`` with ``save(tensors, path, metadata=...)``; return name -> file.

    A full disk becomes a :class:`CosmicBakeError`.
    """
    weight_map: dict[str, str] = {}
    for file, tensors in shards.items():
        try:
            save(tensors, str(out / file), metadata=metadata[file])
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise CosmicBakeError(
                    f"no space left on the device while writing {file}", "free disk space or choose another -o path"
                ) from err
            raise
        weight_map.update(dict.fromkeys(tensors, file))
    return weight_map


def write_index(out: Path, shards: Mapping[str, Mapping[str, TensorSource]], metadata: Mapping | None = None) -> None:
    """``model.safetensors.index.json`` for ``shards``, keeping ``metadata`` (the source index's).

    ``total_size`` is recomputed, and ``total_parameters`` when the metadata has it.
    """
    meta = dict(metadata or {})
    specs = [describe(source) for tensors in shards.values() for source in tensors.values()]
    meta["total_size"] = sum(_nbytes(code, shape) for code, shape in specs)
    if "total_parameters" in meta:
        meta["total_parameters"] = sum(_numel(shape) for _, shape in specs)
    weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    write_json(out / INDEX_FILE, {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))})
