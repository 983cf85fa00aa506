"""Where the GGUF converter reads tensors from, and how it writes a block-quantized one.

A bake streams its edited tensors into the converter (no baked safetensors folder on disk):
:func:`source_listing` describes them as a :class:`~cosmic_bake.export.safetensors_read.Listing`
(headers only), and :func:`tensor_reader` reads either the folder's files or those sources.
:func:`quantized` writes one tensor in a block type (``q8_0``) with llama.cpp's row quantizer, a
chunk of rows at a time, so a float32 copy of a large embedding never exists whole.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from cosmic_bake.export import ggml_quant
from cosmic_bake.export.safetensors_read import DTYPES, Listing, TensorInfo, read_tensor
from cosmic_bake.export.safetensors_write import TensorSource, describe, make_tensor

QUANT_CHUNK_VALUES = 1 << 24  # float32 values quantized at a time (64 MiB)


def ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without its size-1 outer dimensions (at least one left), as ggml counts dimensions."""
    inner = tuple(itertools.dropwhile(lambda n: n == 1, shape))
    return inner or shape[-1:]


def source_listing(folder: Path, tensors: Mapping[str, TensorSource]) -> Listing:
    """A :class:`Listing` of tensors given as sources (headers only), which :func:`tensor_reader` reads from them."""
    infos = {}
    for name, src in tensors.items():
        code, shape = describe(src)
        n = math.prod(shape) * DTYPES[code].itemsize
        infos[name] = TensorInfo(name, "", code, shape, 0, n)
    listing = Listing(folder, [], {}, infos)
    listing.sources = tensors  # type: ignore[attr-defined]
    return listing


def tensor_reader(folder: Path, handles: dict[Path, Any], files: contextlib.ExitStack, sources=None):
    """``read(info) -> tensor``: from the folder's files (handles kept open in ``files``), or from ``sources``."""

    def read(info: TensorInfo) -> torch.Tensor:
        if sources is not None:
            return make_tensor(sources[info.name])
        path = folder / info.file
        if path not in handles:
            handles[path] = files.enter_context(open(path, "rb"))
        return read_tensor(handles[path], info)

    return read


def quantized(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``tensor`` (float, any shape) in block type ``qtype`` as ``uint8 [rows, row bytes]``, rows of its last dimension.

    llama.cpp's quantizer (:func:`~cosmic_bake.export.ggml_quant.quantize_rows`) on float32 rows,
    :data:`QUANT_CHUNK_VALUES` values at a time.
    """
    k = tensor.shape[-1]
    rows = tensor.reshape(-1, k)
    out = np.empty((rows.shape[0], ggml_quant.row_bytes(qtype, k)), dtype=np.uint8)
    step = max(1, QUANT_CHUNK_VALUES // k)
    for s in range(0, rows.shape[0], step):
        out[s : s + step] = ggml_quant.quantize_rows(rows[s : s + step].float().numpy(), qtype)
    return out
