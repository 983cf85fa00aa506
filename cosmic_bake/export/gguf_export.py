"""A transformers model as a GGUF of any ``--outtype``, with as little disk as the type allows.

* float types (f32 / f16 / bf16) and ``q8_0``: written directly by the converter
  (:func:`~cosmic_bake.export.gguf_convert.convert_folder`; ``q8_0`` tensors are quantized there with
  llama.cpp's row quantizer). Disk: the output, nothing else.
* other quantized types (``q4_k_m``, ``q6_k``, ...): llama.cpp chooses each tensor's type by its own
  mixture rules inside ``llama_model_quantize``, which reads a whole float GGUF. That float file is
  written in the source's own precision (bf16 for a bf16 checkpoint, f16 for f16, else f32): it
  holds the weights exactly (llama.cpp widens them to float32 before quantizing, so the result is
  the same as from a float32 file), at half the size of a float32 one for 16-bit sources. Disk:
  the output plus that float file, in a temporary folder beside the output, removed at the end.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cosmic_bake.export import ggml_quant
from cosmic_bake.export.gguf_convert import OUTTYPES, ConvertReport, convert_folder
from cosmic_bake.export.safetensors_read import list_weights
from cosmic_bake.export.safetensors_write import TensorSource, describe

DIRECT_OUTTYPES = tuple(OUTTYPES)  # written by the converter itself: no intermediate file
_FLOAT_CODES = {"BF16": "bf16", "F16": "f16"}


def intermediate_type(codes: set[str]) -> str:
    """The float GGUF type that holds weights of these safetensors dtype codes exactly."""
    codes = {c for c in codes if c in ("F64", "F32", "F16", "BF16")}
    if len(codes) == 1 and next(iter(codes)) in _FLOAT_CODES:
        return _FLOAT_CODES[next(iter(codes))]
    return "f32"


def _matrix_codes(folder: Path, tensors: Mapping[str, TensorSource] | None) -> set[str]:
    """The dtype codes of the 2-D+ weights (what the intermediate file must hold)."""
    if tensors is not None:
        described = [describe(t) for t in tensors.values()]
        return {code for code, shape in described if len(shape) >= 2}
    return {t.dtype for t in list_weights(folder).tensors.values() if len(t.shape) >= 2}


def write_gguf(
    folder: Path,
    out: Path,
    outtype: str,
    *,
    metadata: Mapping[str, str | int | float] | None = None,
    tensors: Mapping[str, TensorSource] | None = None,
    name: str | None = None,
) -> tuple[ConvertReport, dict]:
    """Write ``folder`` (or ``tensors`` with ``folder``'s config and tokenizer) as the GGUF ``out``.

    ``name`` is the GGUF's ``general.name`` (:func:`~cosmic_bake.export.gguf_convert.convert_folder`).
    Returns the converter's report and a record of the route: ``{"route": "direct"}`` or
    ``{"route": "float-then-llama-quantize", "intermediate": TYPE, "intermediate_bytes": N}``.
    """
    ggml_quant.file_type(outtype)
    if outtype in DIRECT_OUTTYPES:
        return convert_folder(folder, out, outtype, metadata=metadata, tensors=tensors, name=name), {"route": "direct"}
    float_type = intermediate_type(_matrix_codes(folder, tensors))
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as work:
        float_file = Path(work) / "float.gguf"
        report = convert_folder(folder, float_file, float_type, metadata=metadata, tensors=tensors, name=name)
        size = float_file.stat().st_size
        final = Path(work) / "final.gguf"
        ggml_quant.quantize_file(float_file, final, outtype)
        float_file.unlink()
        os.replace(final, out)
    return report, {"route": "float-then-llama-quantize", "intermediate": float_type, "intermediate_bytes": size}
