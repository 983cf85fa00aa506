"""llama.cpp's own quantizers, reached through the libraries llama-cpp-python ships.

Two entry points, both llama.cpp code rather than a re-implementation, so a tensor we write is
bit-for-bit what llama.cpp's tools would write from the same floats:

* :func:`quantize_rows`: ``ggml_quantize_chunk`` from ``libggml-base`` (the per-tensor quantizer
  ``llama-quantize`` calls), for the few tensors a bake edits inside an already quantized GGUF.
* :func:`quantize_file`: ``llama_model_quantize`` (the whole-file quantizer with llama.cpp's
  per-tensor type mixtures such as Q4_K_M), for float GGUF files written from a transformers model.

Dequantization uses gguf-py's numpy decoders (:func:`dequantize_rows`), which mirror ggml's.
Which types are accepted is decided by :func:`writable`: ggml cannot quantize a row whose length is
not a multiple of the type's block, and the i-quants need an importance matrix we do not have.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize

from cosmic_bake.errors import CosmicBakeError

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

# ``--outtype`` names -> llama.cpp file types (``llama_ftype``); float ones are written directly.
FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0,
    "q5_1": LlamaFileType.MOSTLY_Q5_1,
    "q2_k": LlamaFileType.MOSTLY_Q2_K,
    "q3_k_s": LlamaFileType.MOSTLY_Q3_K_S,
    "q3_k_m": LlamaFileType.MOSTLY_Q3_K_M,
    "q3_k_l": LlamaFileType.MOSTLY_Q3_K_L,
    "q4_k_s": LlamaFileType.MOSTLY_Q4_K_S,
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_s": LlamaFileType.MOSTLY_Q5_K_S,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}
FLOAT_OUTTYPES = ("f32", "f16", "bf16")

# Tensor types a user may pick for edited tensors that cannot keep their source type.
EDITED_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_0", "q5_1", "q4_k", "q4_0", "q4_1")


def _lib_dir() -> Path:
    try:
        import llama_cpp
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise CosmicBakeError("llama-cpp-python is not installed", "pip install llama-cpp-python") from err
    return Path(llama_cpp.__file__).parent / "lib"


@functools.cache
def _ggml() -> ctypes.CDLL:
    """``libggml-base`` with the prototypes we call declared (wrong prototypes would corrupt the stack)."""
    from llama_cpp._ctypes_extensions import load_shared_library

    lib = load_shared_library("ggml-base", _lib_dir())
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def tensor_type(name: str) -> GGMLQuantizationType:
    """``"q8_0"`` -> ``GGMLQuantizationType.Q8_0``, with a one-line error for unknown names."""
    key = name.strip().upper()
    if key not in GGMLQuantizationType.__members__:
        raise CosmicBakeError(f"unknown GGUF tensor type '{name}'", f"use one of {', '.join(EDITED_TYPES)}")
    return GGMLQuantizationType[key]


def file_type(outtype: str) -> LlamaFileType:
    """``--outtype`` name -> llama.cpp file type."""
    key = outtype.strip().lower()
    if key not in FILE_TYPES:
        raise CosmicBakeError(f"unknown --outtype '{outtype}'", f"use one of {', '.join(FILE_TYPES)}")
    return FILE_TYPES[key]


def writable(qtype: GGMLQuantizationType, row_length: int) -> str | None:
    """Why rows of ``row_length`` values cannot be stored as ``qtype`` by ggml, or None if they can."""
    if qtype in FLOAT_TYPES:
        return None
    if qtype not in GGML_QUANT_SIZES:
        return f"{qtype.name} is not a type ggml stores"
    block = GGML_QUANT_SIZES[qtype][0]
    if row_length % block:
        return f"{qtype.name} packs rows in blocks of {block} values and these rows have {row_length}"
    if _ggml().ggml_quantize_requires_imatrix(int(qtype)):
        return f"{qtype.name} needs an importance matrix"
    return None


def row_bytes(qtype: GGMLQuantizationType, row_length: int) -> int:
    """Bytes one row of ``row_length`` values takes in ``qtype``."""
    block, size = GGML_QUANT_SIZES[qtype]
    return row_length // block * size


def quantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize float rows ``[n, k]`` to ``qtype`` with ggml's quantizer; returns ``uint8 [n, row_bytes]``."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = rows.shape
    reason = writable(qtype, k)
    if reason is not None:
        raise CosmicBakeError(f"cannot write a [{n}, {k}] tensor as {qtype.name}: {reason}", "pick another type")
    out = np.empty((n, row_bytes(qtype, k)), dtype=np.uint8)
    written = _ggml().ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n, k, None)
    if written != out.nbytes:  # pragma: no cover - would mean a prototype mismatch
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def dequantize_rows(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Stored bytes (or float array) of ``qtype`` -> float32 rows, the values llama.cpp computes with."""
    if qtype == GGMLQuantizationType.F32:
        return np.asarray(data, dtype=np.float32)
    return np.asarray(dequantize(np.asarray(data), qtype), dtype=np.float32)


def quantize_file(src: Path, dst: Path, outtype: str, threads: int = 0) -> None:
    """Quantize the float GGUF ``src`` into ``dst`` with llama.cpp's ``llama_model_quantize``.

    llama.cpp picks each tensor's type by its own mixture rules for ``outtype`` (e.g. Q4_K_M keeps
    some ``ffn_down`` in Q6_K) and falls back to a legal type where a row does not fit a block.
    Metadata, tokenizer and our provenance keys are carried over by llama.cpp itself.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(outtype))
    params.nthread = threads
    from llama_cpp._utils import suppress_stdout_stderr

    llama_cpp.llama_backend_init()
    with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor; the CLI prints its own summary
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise CosmicBakeError(
            f"llama.cpp could not quantize to {outtype} (llama_model_quantize returned {rc})",
            "try another --outtype (f16 or q8_0 always fit)",
        )
