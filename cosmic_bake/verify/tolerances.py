"""Pass thresholds of ``verify``: per storage dtype (transformers) and per GGUF tensor class (llama.cpp)."""

from __future__ import annotations

# dtype -> (max KL, min top-1 agreement). float32: float error only. Half precision: the baked
# weights are rounded after the edit, so logits move by about the storage precision.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1.0),
    "float32": (1e-6, 1.0),
    "bfloat16": (2e-2, 0.95),
    "float16": (5e-3, 0.98),
}


def tolerances_for(dtype: str) -> tuple[float, float]:
    """(max KL, min top-1 agreement) for a model stored in ``dtype``."""
    return TOLERANCES.get(dtype, TOLERANCES["bfloat16"])


def coarser(*dtypes: str) -> str:
    """The least precise of ``dtypes`` (by tolerance): the one whose rounding dominates."""
    known = [d for d in dtypes if d]
    return max(known, key=lambda d: tolerances_for(d)[0])


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_dtype(folder) -> str:
    """The least precise float dtype among a safetensors folder's matrices (what the edit was rounded to)."""
    from cosmic_bake.export.safetensors_read import list_weights

    found = {
        _SAFETENSORS_DTYPES[t.dtype]
        for t in list_weights(folder).tensors.values()
        if len(t.shape) >= 2 and t.dtype in _SAFETENSORS_DTYPES
    }
    return coarser(*found) if found else ""


# GGUF in llama.cpp, by the least precise weight type in the file: (mean KL, min top-1 agreement).
# llama.cpp's CPU kernels round activations to 8 bits (or to f16) before quantized (or half)
# matrix products, so even an unedited file differs from transformers by the "runtime floor"
# that verify also measures; the gates sit above that floor and below what a wrong edit gives
# (removing the direction wrongly moves mean KL by ~1e-2 and more on these models). Top-1 gates
# are loose for quantized files: near-ties flip (and MoE routing flips whole experts).
GGUF_TOLERANCES: dict[str, tuple[float, float]] = {
    "F32": (1e-6, 0.999),
    "F16": (2e-3, 0.98),
    "BF16": (5e-3, 0.97),
    "8-bit": (1e-2, 0.90),
    "6-bit": (2e-2, 0.88),
    "5-bit": (4e-2, 0.85),
    "4-bit": (1.5e-1, 0.75),
    "lower": (3e-1, 0.65),
}


def gguf_class(type_name: str) -> str:
    """Tolerance class of a GGML tensor type name."""
    t = type_name.upper()
    if t in ("F32", "F64", "F16", "BF16"):
        return "F32" if t in ("F32", "F64") else t
    bits = {"Q8": "8-bit", "Q6": "6-bit", "Q5": "5-bit", "Q4": "4-bit", "IQ4": "4-bit", "MXFP4": "4-bit"}
    for prefix, cls in sorted(bits.items(), key=lambda kv: -len(kv[0])):
        if t.startswith(prefix):
            return cls
    return "lower"


_ORDER = list(GGUF_TOLERANCES)


def weight_class(path) -> str:
    """The least precise tolerance class among a GGUF's matrices (2-D and larger tensors)."""
    from cosmic_bake.export.gguf_io import open_gguf

    classes = {gguf_class(t.tensor_type.name) for t in open_gguf(path).tensors if len(t.shape) >= 2}
    return max(classes, key=_ORDER.index) if classes else "F32"
