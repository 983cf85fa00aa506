"""Safetensors checkpoints: read headers and tensors, lay out shard files, stream shards out.

The format: an 8-byte little-endian header length ``N``, a JSON header (``__metadata__`` and, per
tensor, its dtype code, shape and ``data_offsets`` relative to the end of the header), padded
with spaces so that ``N`` is a multiple of 8, then the tensors' bytes, back to back.

Reading: :func:`read_header` parses the header itself to get absolute byte offsets, so that
:func:`read_tensor` can use plain file reads rather than ``safe_open``'s memory map, whose page
cache would count against the bake's memory on top of the copies being edited.

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
from cosmic_bake.outputs import read_json, write_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
CHUNK_BYTES = 16 * 2**20  # plain reads and writes move at most this much at a time
_MAX_HEADER = 100_000_000
_KERNEL_COPY_BYTES = 2**30  # one os.copy_file_range call
# copy_file_range cannot serve these files (other filesystem, old kernel, sandbox): use plain reads
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM}

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in _DTYPES.items()}


# --------------------------------------------------------------------------------------------
# Reading headers and tensors


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a safetensors file, as its header describes it (nothing loaded)."""

    name: str
    file: str  # file name inside the model folder
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Listing:
    """The weight files of a model folder: per file its header metadata and tensors, in order."""

    folder: Path
    files: list[str]
    metadata: dict[str, dict[str, str]]
    tensors: dict[str, TensorInfo]  # name -> info, in file order
    index: dict | None = None  # the source's model.safetensors.index.json, if sharded

    def largest_file_bytes(self) -> int:
        return max((self.folder / f).stat().st_size for f in self.files)


def read_header(path: Path) -> tuple[dict[str, str], list[TensorInfo]]:
    """Parse a safetensors header: its metadata and tensor records, without reading any data.

    The format is an 8-byte little-endian header length, a JSON header, then the data; parsing it
    ourselves gives the byte offsets the streaming reader needs.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError("header length out of range")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise CosmicBakeError(
            f"{path} is not a readable safetensors file ({err})", "re-download or re-export the model"
        ) from err
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos = []
    for name, rec in header.items():
        info = _tensor_info(path, name, rec, base)
        if info.end > size:
            raise CosmicBakeError(f"{path.name} ends inside tensor {name}", "re-download the model (truncated file)")
        infos.append(info)
    infos.sort(key=lambda t: t.begin)
    return meta, infos


def _tensor_info(path: Path, name: str, rec: dict, base: int) -> TensorInfo:
    """One header record, checked: a known dtype and a byte range that fits its shape."""
    try:
        begin, end = (int(x) for x in rec["data_offsets"])
        info = TensorInfo(
            name, path.name, str(rec["dtype"]), tuple(int(s) for s in rec["shape"]), base + begin, base + end
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CosmicBakeError(f"{path.name}: malformed header entry for {name}", "re-download the model") from err
    if info.dtype not in _DTYPES:
        raise CosmicBakeError(
            f"{path.name}: tensor {name} has unsupported dtype {info.dtype}",
            "convert the model to float16, bfloat16 or float32 safetensors",
        )
    if info.nbytes != info.numel * _DTYPES[info.dtype].itemsize:
        raise CosmicBakeError(
            f"{path.name}: tensor {name} has a byte range that does not fit its shape", "re-download the model"
        )
    return info


def _read_index(path: Path) -> dict:
    """A shard index with a ``weight_map`` of tensor name -> shard file (and object ``metadata``, if any)."""
    fix = "re-download the model's index (or the whole model)"
    index = read_json(path, fix)
    weight_map, metadata = index.get("weight_map"), index.get("metadata")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CosmicBakeError(f"{path} has no weight_map of tensor name -> shard file", fix)
    if metadata is not None and not isinstance(metadata, dict):
        raise CosmicBakeError(f"{path} has a metadata entry that is not an object", fix)
    return index


def list_weights(folder: Path) -> Listing:
    """All safetensors weights of ``folder`` (one file or an indexed set of shards)."""
    folder = Path(folder)
    index = None
    if (folder / INDEX_FILE).is_file():
        index = _read_index(folder / INDEX_FILE)
        files = list(dict.fromkeys(index["weight_map"].values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        raise CosmicBakeError(
            f"{folder} has no safetensors weights{f' (found {other[:3]})' if other else ''}",
            "convert the model to safetensors first (transformers: save_pretrained with safe_serialization)",
        )
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise CosmicBakeError(f"{folder} lacks the shard {missing[0]} named in its index", "re-download the model")
    metadata, tensors = {}, {}
    for f in files:
        metadata[f], infos = read_header(folder / f)
        for info in infos:
            tensors[info.name] = info
    return Listing(folder, files, metadata, tensors, index)


def read_tensor(fh, info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh, writable memory (plain reads: no memory map to pin pages)."""
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    fh.seek(info.begin)
    if info.nbytes and fh.readinto(memoryview(raw.numpy())) != info.nbytes:
        raise CosmicBakeError(f"{info.file} ended inside tensor {info.name}", "re-download the model")
    return raw.view(_DTYPES[info.dtype]).reshape(info.shape)


# --------------------------------------------------------------------------------------------
# Shard layout


def parse_size(size: str | int | None) -> int | None:
    """``"5GB"`` / ``"200KB"`` / ``"1GiB"`` / bytes -> bytes (transformers' convention), or None."""
    if size is None or isinstance(size, int):
        return size
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size.strip()) if not size.strip().isdigit() else int(size)
    except ValueError as err:
        raise CosmicBakeError(f"cannot read the shard size '{size}'", "use a size like 2GB, 500MB or 1GiB") from err
    if value <= 0:
        raise CosmicBakeError(f"shard size '{size}' is not positive", "use a size like 2GB")
    return value


def same_shards(listing: Listing, order: list[str], beside: str) -> dict[str, list[str]]:
    """The source's shard layout; a tensor the source lacks (a new lm_head) goes into ``beside``'s shard."""
    shards: dict[str, list[str]] = {f: [] for f in listing.files}
    for name in order:
        info = listing.tensors.get(name) or listing.tensors[beside]
        shards[info.file].append(name)
    return shards


def packed_shards(order: list[str], sizes: dict[str, int], limit: int) -> dict[str, list[str]]:
    """Greedy packing in tensor order, as transformers does; a tensor larger than the limit gets its own shard."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in order:
        if groups[-1] and used + sizes[name] > limit:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


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


def torch_dtype(code: str) -> torch.dtype:
    """safetensors dtype code (``"F32"``) -> torch dtype."""
    return _DTYPES[code]


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _CODES[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store dtype {dtype}") from None


def _describe(source: TensorSource) -> tuple[str, tuple[int, ...]]:
    """Dtype code and shape of a tensor to write, without making or reading it."""
    if isinstance(source, torch.Tensor):
        return dtype_code(source.dtype), tuple(source.shape)
    if isinstance(source, StoredTensor):
        return source.info.dtype, source.info.shape
    if isinstance(source, DeferredTensor):
        if source.dtype not in _DTYPES:
            raise ValueError(f"unknown safetensors dtype code {source.dtype!r}")
        return source.dtype, tuple(int(s) for s in source.shape)
    raise TypeError(f"cannot write a {type(source).__name__} as a tensor")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nbytes(code: str, shape: tuple[int, ...]) -> int:
    return _numel(shape) * _DTYPES[code].itemsize


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
    specs = [(name, *_describe(source)) for name, source in tensors.items()]
    specs.sort(key=lambda spec: -_DTYPES[spec[1]].itemsize)
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
    specs = [_describe(source) for tensors in shards.values() for source in tensors.values()]
    meta["total_size"] = sum(_nbytes(code, shape) for code, shape in specs)
    if "total_parameters" in meta:
        meta["total_parameters"] = sum(_numel(shape) for _, shape in specs)
    weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    write_json(out / INDEX_FILE, {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))})
