"""verify tells the truth at every output type: an unedited file FAILS, the right edit PASSES.

Absolute KL gates alone pass an unedited 4-bit file (its rounding is as large as the edit); the
relative gate compares the baked file with the unedited model stored the same way. Each storage
class is checked both ways on a tiny model whose direction really matters: the mean residual at
layer 2 (like a refusal direction, a difference of residual means), whose removal moves the
logits well above any 4-bit rounding (mean KL ~0.5 on the 256-wide llama).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import save_direction

from cosmic_bake import api
from cosmic_bake.prompts.sets import verify_prompts
from cosmic_bake.verify.logits import RATIO_MAX, judge
from cosmic_bake.verify.tolerances import coarser

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS_LIMIT = 3  # per built-in set: 6 prompts


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Cached unedited references go to this test's folder, not the user's cache."""
    monkeypatch.setenv("COSMIC_BAKE_MODELS", str(tmp_path / "cache"))


def _strong_run(folder: Path, tmp: Path) -> Path:
    """A run folder whose direction is the mean residual entering layer 2 on the verify prompts."""
    from cosmic_bake.model.chat import ChatFormat
    from cosmic_bake.model.loading import load_model

    lm = load_model(folder)
    batch = ChatFormat(lm.tokenizer).encode(verify_prompts(limit=PROMPTS_LIMIT))
    with torch.no_grad():
        hidden = lm.model(**batch, use_cache=False, output_hidden_states=True).hidden_states[2]
    return save_direction(tmp / "run", hidden[batch["attention_mask"].bool()].double().mean(0))


def _verify(original: Path | str, baked: Path, run: Path):
    return api.verify(str(original), baked, run, limit=PROMPTS_LIMIT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_transformers_folder_gate_per_dtype(dtype, tiny_model_factory, tmp_path):
    """A checkpoint baked in its own dtype PASSES at the default float32 verify; the unedited copy FAILS."""
    folder = tiny_model_factory("llama", dtype=dtype)
    run = _strong_run(folder, tmp_path)
    baked = tmp_path / "baked"
    api.bake(str(folder), run, baked)
    report = _verify(folder, baked, run)
    name = str(dtype).removeprefix("torch.")
    assert report.stored_dtype == name and report.dtype == coarser("float32", name)
    assert report.passed, report.to_dict()
    unedited = tmp_path / "unedited"
    shutil.copytree(folder, unedited)
    bad = _verify(folder, unedited, run)
    assert not bad.passed and bad.ratio > RATIO_MAX, bad.to_dict()
    assert report.unedited_mean_kl == pytest.approx(bad.unedited_mean_kl)


def test_bf16_tolerance_follows_storage_not_compute(tiny_model_factory, tmp_path):
    """Held to float32's 1e-6 (the dtype verify computes in), a bf16 bake FAILS; at bf16's, it PASSES."""
    folder = tiny_model_factory("llama", dtype=torch.bfloat16)
    run = _strong_run(folder, tmp_path)
    baked = tmp_path / "baked"
    api.bake(str(folder), run, baked)
    report = _verify(folder, baked, run)
    assert report.passed and report.dtype == "bfloat16"
    assert report.max_kl > 1e-6  # the float32 tolerance would have failed this correct bake


# (outtype, reference the unedited file is measured from)
GGUF_CASES = ["f32", "f16", "bf16", "q8_0", "q4_k_m", "q4_0", "q4_1"]


@pytest.mark.llama
@pytest.mark.parametrize("outtype", GGUF_CASES)
def test_gguf_gate_per_type(outtype, tiny_model_factory, tmp_path):
    """``bake --outtype T`` PASSES; the unedited model quantized to T (the cached reference) FAILS."""
    folder = tiny_model_factory("llama", hidden_size=256, intermediate_size=512)
    run = _strong_run(folder, tmp_path)
    out = tmp_path / f"baked-{outtype}.gguf"
    api.bake(str(folder), run, out, format="gguf", outtype=outtype)
    report = _verify(folder, out, run)
    assert report.unedited_reference["outtype"] == outtype and report.unedited_reference["cached"] is False
    assert report.ratio is not None and report.ratio <= RATIO_MAX, report.to_dict()
    assert report.mean_kl <= report.kl_tolerance, report.to_dict()
    if outtype in ("f32", "f16", "bf16", "q8_0"):  # a tiny 4-bit model's near-ties flip: no top-1 claim there
        assert report.passed, report.to_dict()
    cached = Path(report.unedited_reference["file"])
    reference = next((tmp_path / "cache" / "unedited").glob(cached.name))
    copy = tmp_path / f"unedited-{outtype}.gguf"
    shutil.copy(reference, copy)  # no manifest: typed by its header, measured against the same cache entry
    bad = _verify(folder, copy, run)
    assert bad.unedited_reference["cached"] is True
    assert not bad.passed and bad.ratio == pytest.approx(1.0, abs=1e-9), bad.to_dict()
    assert any("no closer to the hook" in r for r in bad.reasons)


@pytest.mark.llama
@pytest.mark.parametrize("source_type", ["q8_0", "q4_0"])
def test_gguf_source_types_measured_against_the_source(source_type, tiny_model_factory, tmp_path):
    """GGUF in, GGUF out: the unedited reference is the source file itself; given as BAKED it FAILS."""
    from cosmic_bake.export.ggml_quant import quantize_file
    from cosmic_bake.export.gguf_convert import convert_folder

    folder = tiny_model_factory("llama", hidden_size=256, intermediate_size=512)
    run = _strong_run(folder, tmp_path)
    source = tmp_path / f"source-{source_type}.gguf"
    convert_folder(folder, tmp_path / "f32.gguf", "f32")
    quantize_file(tmp_path / "f32.gguf", source, source_type)
    out = tmp_path / "baked.gguf"
    api.bake(str(source), run, out, format="gguf", edited_type_always=True)
    report = _verify(source, out, run)
    assert report.unedited_reference["kind"] == "source GGUF"
    assert report.ratio <= RATIO_MAX, report.to_dict()
    bad = _verify(source, source, run)
    assert not bad.passed and bad.ratio == pytest.approx(1.0, abs=1e-9)


def test_verify_cli_prints_the_reason_and_exits_1(tiny_model_factory, tmp_path):
    """The command shows both KLs and the ratio, names why it failed, and the JSON report keeps them."""
    from click.testing import CliRunner

    from cosmic_bake.cli import cli

    folder = tiny_model_factory("llama")
    run = _strong_run(folder, tmp_path)
    unedited = tmp_path / "unedited"
    shutil.copytree(folder, unedited)
    out = tmp_path / "verify.json"
    result = CliRunner().invoke(
        cli, ["verify", str(folder), str(unedited), "--direction", str(run), "--limit", "2", "-o", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert "ratio" in result.output and "FAIL: the baked model is no closer" in result.output
    saved = json.loads(out.read_text())
    assert saved["passed"] is False and saved["ratio"] > RATIO_MAX and saved["reasons"]


def test_judge_gates():
    """Both gates, on numbers: each alone can fail a file."""
    assert judge(1e-3, 1e-2, 0.99, 0.9, 1e-3, 1e-1) == (pytest.approx(0.01), [])
    ratio, reasons = judge(1e-3, 1e-2, 0.99, 0.9, 1e-3, 2e-3)  # within tolerance, but no edit
    assert ratio == pytest.approx(0.5) and len(reasons) == 1
    _, reasons = judge(5e-2, 1e-2, 0.5, 0.9, 5e-2, 1.0)  # carries the edit, but too noisy
    assert len(reasons) == 2
    assert judge(0.0, 1e-6, 1.0, 1.0, 0.0, 0.0) == (None, [])  # an edit without effect (add at alpha 0)
    assert judge(1e-3, 1e-2, 0.99, 0.9, 1e-3, None) == (None, [])
