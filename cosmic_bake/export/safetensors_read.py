"""Safetensors checkpoints: read headers and tensors, lay out shard files.

The format: an 8-byte little-endian header length ``N``, a JSON header (``__metadata__`` and, per
tensor, its dtype code, shape and ``data_offsets`` relative to the end of the header), padded
with spaces so that ``N`` is a multiple of 8, then the tensors' bytes, back to back.

Reading: :func:`read_header` parses the header itself to get absolute byte offsets, so that
:func:`read_tensor` can use plain file reads rather than ``safe_open``'s memory map, whose page
cache would count against the bake's memory on top of the copies being edited."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.outputs import read_json

INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


_MAX_HEADER = 100_000_000


DTYPES: dict[str, torch.dtype] = {
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


_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


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
    if info.dtype not in DTYPES:
        raise CosmicBakeError(
            f"{path.name}: tensor {name} has unsupported dtype {info.dtype}",
            "convert the model to float16, bfloat16 or float32 safetensors",
        )
    if info.nbytes != info.numel * DTYPES[info.dtype].itemsize:
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
    return raw.view(DTYPES[info.dtype]).reshape(info.shape)


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


def torch_dtype(code: str) -> torch.dtype:
    """safetensors dtype code (``"F32"``) -> torch dtype."""
    return DTYPES[code]


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _CODES[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store dtype {dtype}") from None
