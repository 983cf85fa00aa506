"""GGUF file I/O for baking: open a source with clear errors, write a copy with some tensors replaced.

Format work only (gguf-py's reader and writer); which tensors change and how is decided in
:mod:`cosmic_bake.bake.gguf_edit`. Metadata is carried over key by key with its stored value type, so
tokenizer, chat template and architecture hyperparameters reach the output exactly as they were;
unchanged tensors are written from the source's memory map, byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from cosmic_bake.errors import CosmicBakeError, first_line

_SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.alignment")
_BASE_MODEL_KEYS = "general.base_model."


def check_magic(path: Path) -> Path:
    """A missing or foreign file is one clear error (cheap: reads 4 bytes, parses nothing)."""
    path = Path(path)
    if not path.is_file():
        raise CosmicBakeError(f"{path} does not exist", "pass the path of a .gguf file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise CosmicBakeError(f"{path} is not a GGUF file (it starts with {magic!r})", "pass a .gguf model file")
    return path


def open_gguf(path: Path) -> GGUFReader:
    """Read a GGUF file's header and map its tensors; a missing, truncated or foreign file is one clear error."""
    path = check_magic(path)
    try:
        reader = GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - gguf-py raises assorted errors on damaged files
        raise CosmicBakeError(
            f"{path} is not a complete GGUF file ({first_line(err)})", "re-download or re-export it"
        ) from err
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    size = path.stat().st_size
    if end > size:
        raise CosmicBakeError(
            f"{path} is truncated: its tensors need {end} bytes and the file has {size}", "re-download it"
        )
    return reader


# GGUF value types (the spec's numbering) -> struct format of one scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_metadata(path: Path, prefix: str = "") -> dict:
    """The metadata keys starting with ``prefix``, read from the header alone.

    gguf-py's reader builds every field on opening, the tokenizer's vocabulary arrays included
    (about 3 s for a 49k-token vocabulary on two cores); provenance needs a few ``general.*``
    strings. Arrays are skipped without being decoded unless their key is asked for.
    """
    import mmap
    import struct

    with open(check_magic(path), "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version > 0xFFFF:  # a big-endian file: leave it to gguf-py
            reader = open_gguf(path)
            return {k: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}
        at, out = 24, {}

        def scalar(kind: int, at: int):
            if kind == _STRING:
                (n,) = struct.unpack_from("<Q", buf, at)
                return bytes(buf[at + 8 : at + 8 + n]).decode("utf-8", "replace"), at + 8 + n
            fmt = "<" + _SCALARS[kind]
            return struct.unpack_from(fmt, buf, at)[0], at + struct.calcsize(fmt)

        for _ in range(n_kv):
            (n,) = struct.unpack_from("<Q", buf, at)
            key = bytes(buf[at + 8 : at + 8 + n]).decode("utf-8", "replace")
            (kind,) = struct.unpack_from("<I", buf, at + 8 + n)
            at += 12 + n
            wanted = key.startswith(prefix)
            if kind != _ARRAY:
                value, at = scalar(kind, at)
            else:
                item, count = struct.unpack_from("<IQ", buf, at)
                at += 12
                if item != _STRING and not wanted:
                    at += count * struct.calcsize(_SCALARS[item])
                    continue
                value = []
                for _ in range(count):
                    v, at = scalar(item, at)
                    if wanted:
                        value.append(v)
            if wanted:
                out[key] = value
        return out


def field_value(reader: GGUFReader, key: str, default=None):
    """One metadata value as a Python object (str, int, float, list), or ``default``."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def architecture(reader: GGUFReader) -> str:
    """``general.architecture`` (llama.cpp's architecture name)."""
    arch = field_value(reader, "general.architecture")
    if not arch:
        raise CosmicBakeError("the GGUF file has no general.architecture", "re-export it with a current llama.cpp")
    return str(arch)


def alignment(reader: GGUFReader) -> int:
    return int(field_value(reader, "general.alignment", GGUF_DEFAULT_ALIGNMENT))


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its type, element shape (numpy order) and how its bytes are made.

    ``data`` returns the stored array (uint8 rows for quantized types); it is called once, when the
    writer reaches the tensor, so only one edited tensor is in memory at a time.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int
    data: Callable[[], np.ndarray]


def copied(tensor) -> OutTensor:
    """A source tensor written unchanged (its bytes straight from the memory map)."""
    shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
    return OutTensor(tensor.name, tensor.tensor_type, shape, int(tensor.n_bytes), lambda: tensor.data)


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, replaced: set[str]) -> None:
    """Copy the source's keys (except the ``replaced`` ones, e.g. provenance of an earlier bake).

    When the new keys name a base model (``general.base_model.*``), all of the source's are
    dropped: they describe the source's own base, and a left-over ``.1.*`` would dangle.
    """
    rebased = any(k.startswith(_BASE_MODEL_KEYS) for k in replaced)
    for key, field in reader.fields.items():
        if key.startswith(_SKIPPED_KEYS) or key in replaced or (rebased and key.startswith(_BASE_MODEL_KEYS)):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def add_metadata(writer: GGUFWriter, metadata: Mapping[str, str | int | float | bool]) -> None:
    """Add the caller's keys verbatim; refuse ones that would overwrite what llama.cpp reads."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise CosmicBakeError(f"GGUF metadata key {key!r} is not a non-empty string", "fix the caller")
        if key in writer.kv_data[0]:
            raise CosmicBakeError(f"GGUF metadata key {key!r} is already set in this file", "use another name")
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, np.uint32):  # gguf-py's type for counts (general.base_model.count)
            writer.add_uint32(key, int(value))
        elif isinstance(value, int):
            writer.add_int64(key, value)
        elif isinstance(value, float):
            writer.add_float64(key, value)
        elif isinstance(value, str):
            writer.add_key_value(key, value, GGUFValueType.STRING)  # add_string drops empty strings
        else:
            raise CosmicBakeError(
                f"GGUF metadata {key!r} has a {type(value).__name__} value", "pass a str, int or float"
            )


def write_gguf(
    reader: GGUFReader,
    path: Path,
    tensors: Iterable[OutTensor],
    metadata: Mapping[str, str | int | float | bool],
    on_tensor: Callable[[OutTensor], None] | None = None,
) -> None:
    """Write ``path``: the source's metadata plus ``metadata``, then ``tensors`` in order.

    The caller writes to a temporary path and renames it; this function only writes.
    """
    tensors = list(tensors)
    writer = GGUFWriter(path=None, arch=architecture(reader))
    align = alignment(reader)
    if align != GGUF_DEFAULT_ALIGNMENT:
        writer.data_alignment = align
        writer.add_custom_alignment(align)
    _copy_metadata(reader, writer, set(metadata))
    add_metadata(writer, metadata)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.open_output_file(Path(path))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = t.data()
            if data.nbytes != t.nbytes:  # pragma: no cover - a planning bug, never silently written
                raise RuntimeError(f"{t.name}: {data.nbytes} bytes made, {t.nbytes} planned")
            writer.write_tensor_data(np.ascontiguousarray(data))
            if on_tensor is not None:
                on_tensor(t)
        writer.flush()
        for fh in writer.fout or []:
            os.fsync(fh.fileno())
    finally:
        writer.close()
