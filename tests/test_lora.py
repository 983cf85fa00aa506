"""LoRA export of a removal edit: PEFT adapter in transformers and GGUF adapter in llama.cpp equal the hook."""

from __future__ import annotations

import json

import pytest
from test_gguf_bake import _run_dir

from cosmic_bake import api
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export.gguf_convert import convert_folder
from cosmic_bake.export.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, GGUF_ADAPTER
from cosmic_bake.model.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("arch", "tied"),
    [("llama", False), ("llama", True), ("qwen2", False), ("gemma2", True), ("gemma3_text", True), ("phi3", False)],
)
def test_peft_adapter_equals_the_hook(arch, tied, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch, tied=tied, bias=arch == "qwen2")
    run, out = _run_dir(folder, tmp_path), tmp_path / "lora"
    done = api.export_lora(str(folder), run, out, gguf=False)
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "manifest.json"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 1 and len(cfg["target_modules"]) == done["modules"] == 2 * 4 + 1
    report = api.verify(str(folder), out, run, limit=2)
    assert report.passed and report.max_kl <= 1e-6, report.to_dict()
    # the adapter is far smaller than the model it edits
    model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert done["bytes"][ADAPTER_WEIGHTS] < model_bytes / 4


@pytest.mark.llama
@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", False)])
def test_gguf_adapter_on_the_base_gguf_equals_the_hook(arch, tied, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch, tied=tied, bias=arch == "qwen2")
    base = tmp_path / "base.gguf"
    convert_folder(folder, base, "f32")
    run, out = _run_dir(folder, tmp_path), tmp_path / "lora"
    api.export_lora(str(base), run, out, allow_mismatch=True)
    report = api.verify(str(base), out / GGUF_ADAPTER, run, limit=2)
    assert report.runtime == "llama.cpp" and report.passed and report.mean_kl <= 1e-6, report.to_dict()
    assert report.runtime_floor["mean_kl"] <= 1e-6  # the base alone matches transformers: the adapter is exact


def test_tied_model_gets_no_llama_cpp_adapter(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama", tied=True)
    done = api.export_lora(str(folder), _run_dir(folder, tmp_path), tmp_path / "lora")
    assert not (tmp_path / "lora" / GGUF_ADAPTER).exists() and "ties its output head" in done["warnings"][0]
    assert (tmp_path / "lora" / ADAPTER_WEIGHTS).is_file()


def test_lora_refuses_what_it_cannot_carry(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama", num_layers=2)
    run = _run_dir(folder, tmp_path)
    steer = tmp_path / "steer"
    steer.mkdir()
    from cosmic_bake.artifacts import Direction

    Direction.load(run).with_mode("add", 1.0).save(steer)
    with pytest.raises(CosmicBakeError, match="linear removal only"):
        api.export_lora(str(folder), steer, tmp_path / "x")
    moe = tiny_model_factory("mixtral", num_layers=2)
    with pytest.raises(CosmicBakeError, match="fused expert tensors"):
        api.export_lora(str(moe), _run_dir(moe, tmp_path, seed=2), tmp_path / "y", gguf=False)
    biased = tiny_model_factory("llama", num_layers=2, bias=True)
    with pytest.raises(CosmicBakeError, match="a LoRA cannot change biases"):
        api.export_lora(str(biased), _run_dir(biased, tmp_path, seed=3), tmp_path / "z", gguf=False)
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_verify_refuses_a_peft_that_leaves_gemma_embedding_deltas_unscaled(tiny_model_factory, tmp_path, monkeypatch):
    """peft < 0.18 adds embedding LoRA rows after Gemma's sqrt(d) scaling: one line, not a wrong model."""
    from cosmic_bake.export import lora

    folder = tiny_model_factory("gemma3_text", tied=True)
    run, out = _run_dir(folder, tmp_path), tmp_path / "lora"
    api.export_lora(str(folder), run, out, gguf=False)
    monkeypatch.setattr(lora, "_installed_peft", lambda: "0.17.1")
    with pytest.raises(CosmicBakeError) as err:
        api.verify(str(folder), out, run, limit=1)
    assert str(err.value) == (
        "peft 0.17.1 is too old for Gemma embedding adapters (Gemma3TextScaledWordEmbedding scales its rows); "
        "pip install 'peft>=0.18.0'"
    )
    llama = tiny_model_factory("llama")  # an unscaled embedding: any peft will do
    lora.check_peft(load_model(llama).model)
