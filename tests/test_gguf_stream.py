"""``bake --format gguf`` from a transformers model streams: no baked folder, no float file for q8_0.

The direct q8_0 route must write what the old route wrote (bake a safetensors folder, convert it
to a float32 GGUF, quantize that with ``llama_model_quantize``): same tensors, types, shapes and
bytes, same file type. Other quantized types still use llama.cpp's quantizer, from a float file in
the source's own precision (bf16 for a bf16 checkpoint), not float32.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tiny_models import random_direction_run

from cosmic_bake.bake.folder import bake_folder
from cosmic_bake.bake.gguf import bake_to_gguf
from cosmic_bake.export import ggml_quant, gguf_convert, gguf_export, safetensors_write
from cosmic_bake.export.gguf_convert import convert_folder
from cosmic_bake.export.gguf_io import field_value, open_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    return {
        t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), hashlib.sha256(bytes(t.data)).hexdigest())
        for t in open_gguf(path).tensors
    }


def _old_route(folder: Path, run: Path, work: Path, outtype: str) -> Path:
    """What ``bake --format gguf --outtype q8_0`` did before: baked folder, float32 GGUF, llama.cpp quantizer."""
    bake_folder(folder, run, work / "hf", allow_mismatch=True)
    convert_folder(work / "hf", work / "float.gguf", "f32")
    ggml_quant.quantize_file(work / "float.gguf", work / "old.gguf", outtype)
    return work / "old.gguf"


@pytest.mark.parametrize(
    ("arch", "kw"),
    [
        ("llama", {"tied": True, "bias": True}),
        ("qwen2", {}),
        ("qwen2_moe", {"tied": True}),
        ("mixtral", {"dtype": torch.bfloat16}),
        ("phi3", {}),
    ],
)
def test_direct_q8_0_equals_llama_quantize(arch, kw, tiny_model_factory, tmp_path, monkeypatch):
    folder = tiny_model_factory(arch, **kw)
    run = random_direction_run(folder, tmp_path / "run", 3)
    old = _old_route(folder, run, tmp_path, "q8_0")

    def refuse(*_a, **_k):
        raise AssertionError("the direct route wrote a safetensors file or ran the float-file quantizer")

    monkeypatch.setattr(safetensors_write, "write_safetensors", refuse)
    monkeypatch.setattr(ggml_quant, "quantize_file", refuse)
    out = tmp_path / "new.gguf"
    bake = bake_to_gguf(str(folder), run, out, outtype="q8_0")
    assert bake["conversion"] == {"route": "direct"}
    assert _tensors(out) == _tensors(old)
    for key in ("general.file_type", "general.quantization_version"):
        assert field_value(open_gguf(out), key) == field_value(open_gguf(old), key)


def test_mixture_types_quantize_from_a_file_in_the_source_precision(tiny_model_factory, tmp_path, monkeypatch):
    folder = tiny_model_factory("llama", dtype=torch.bfloat16, hidden_size=256, intermediate_size=512)
    run = random_direction_run(folder, tmp_path / "run", 3)
    types = []
    real = gguf_convert.convert_folder

    def spy(folder, out_file, outtype="f32", **kw):
        types.append(outtype)
        return real(folder, out_file, outtype, **kw)

    monkeypatch.setattr(gguf_export, "convert_folder", spy)
    out = tmp_path / "q4.gguf"
    bake = bake_to_gguf(str(folder), run, out, outtype="q4_k_m")
    assert types == ["bf16"]
    assert bake["conversion"]["route"] == "float-then-llama-quantize"
    assert bake["conversion"]["intermediate"] == "bf16"
    assert field_value(open_gguf(out), "general.file_type") == int(ggml_quant.FILE_TYPES["q4_k_m"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_intermediate_type():
    assert gguf_export.intermediate_type({"BF16"}) == "bf16"
    assert gguf_export.intermediate_type({"F16"}) == "f16"
    assert gguf_export.intermediate_type({"F32"}) == "f32"
    assert gguf_export.intermediate_type({"BF16", "F16"}) == "f32"
