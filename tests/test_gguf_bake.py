"""GGUF export of baked models, run in real llama.cpp (llama-cpp-python) and compared with the hook.

Every supported architecture: tiny random HF model -> ``bake --format gguf`` (bake, convert,
llama.cpp quantizer) -> llama.cpp logits at every position == transformers + removal hook within
the output type's tolerance. GGUF in, GGUF out: untouched tensors keep their bytes (sha256 per
tensor), edited ones match the hook. Bad inputs fail with one line and leave nothing behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import ARCHS, random_direction_run

from cosmic_bake.artifacts import Direction
from cosmic_bake.bake.folder import bake_folder
from cosmic_bake.bake.gguf import bake_to_gguf, manifest_path
from cosmic_bake.cli import cli
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export.gguf_convert import convert_folder
from cosmic_bake.export.gguf_io import open_gguf
from cosmic_bake.model.architecture import probe
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.model.llamacpp import LlamaCppModel
from cosmic_bake.model.loading import load_model
from cosmic_bake.verify.logits import verify_gguf
from cosmic_bake.verify.tolerances import GGUF_TOLERANCES

pytestmark = pytest.mark.usefixtures("one_thread")

NO_BIAS_IN_LLAMACPP = ("gemma2", "gemma3_text")  # llama.cpp's Gemma graphs have no q/k/v/o biases

PROMPTS = ["How do I bake bread?", "Write a limerick about a cat who learns to code in Rust."]


def _run_dir(folder: Path, tmp: Path, seed: int = 1) -> Path:
    """A direction artifact with a random direction in the model's hidden size (no model hash: any file)."""
    return random_direction_run(folder, tmp / f"run{seed}", seed)


def _verify(folder: Path, gguf_file: Path, run: Path | None):
    """llama.cpp on ``gguf_file`` vs transformers on ``folder`` + removal hook (no hook when ``run`` is None)."""
    lm = load_model(folder)
    fmt = ChatFormat(lm.tokenizer)
    baked = LlamaCppModel(gguf_file, n_ctx=256, all_logits=True, threads=1)
    try:
        return verify_gguf(lm.model, probe(lm.model), baked, run and Direction.load(run), PROMPTS, fmt)
    finally:
        baked.close()


def _gemma2_skip(folder: Path, source: str, run: Path, out: Path, tmp: Path, **kw) -> tuple[dict, Path]:
    """llama.cpp's gemma2 always ties its head: untying refuses; --embeddings skip matches the hf bake with skip."""
    with pytest.raises(CosmicBakeError, match="--embeddings skip"):
        bake_to_gguf(source, run, out, **kw)
    assert not out.exists()
    bake = bake_to_gguf(source, run, out, embeddings="skip", **kw)
    hf = tmp / "hf_skip"
    bake_folder(folder, run, hf, embeddings="skip")
    return bake, hf


def _tensor_hashes(path: Path) -> dict[str, tuple[str, str]]:
    return {t.name: (t.tensor_type.name, hashlib.sha256(bytes(t.data)).hexdigest()) for t in open_gguf(path).tensors}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_transformers_model_to_gguf_equals_hook(arch, outtype, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch, tied=arch in ("llama", "gemma2"), bias=arch not in NO_BIAS_IN_LLAMACPP)
    run = _run_dir(folder, tmp_path)
    out = tmp_path / "baked.gguf"
    if arch == "gemma2":
        bake, reference = _gemma2_skip(folder, str(folder), run, out, tmp_path, outtype=outtype)
        report = _verify(reference, out, None)
    else:
        bake = bake_to_gguf(str(folder), run, out, outtype=outtype)
        report = _verify(folder, out, run)
    assert bake["route"] == "safetensors-to-gguf" and out.is_file() and manifest_path(out).is_file()
    files = json.loads(manifest_path(out).read_text())["files"]
    assert files == {"baked.gguf": hashlib.sha256(out.read_bytes()).hexdigest()}
    meta = open_gguf(out).fields
    assert meta["cosmic_bake.direction_sha256"].contents() == Direction.load(run).digest
    assert report.weight_type == ("F32" if outtype == "f32" else "8-bit")
    assert report.passed, report.to_dict()
    if outtype == "f32":  # float error only: llama.cpp and transformers sum in different orders
        assert report.mean_kl <= GGUF_TOLERANCES["F32"][0] and report.top1_agreement >= 0.999


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "phi3"])
def test_gguf_to_gguf_keeps_untouched_bytes_and_equals_hook(arch, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch, tied=True, bias=arch not in NO_BIAS_IN_LLAMACPP)
    source = tmp_path / "source.gguf"
    convert_folder(folder, source, "f32")
    before = _tensor_hashes(source)
    run = _run_dir(folder, tmp_path)
    out = tmp_path / "baked.gguf"
    reference = folder
    if arch == "gemma2":
        bake, reference = _gemma2_skip(folder, str(source), run, out, tmp_path)
    else:
        bake = bake_to_gguf(str(source), run, out)
    assert bake["route"] == "gguf-to-gguf"
    after = _tensor_hashes(out)
    edited = set(bake["types"])
    assert edited and ("token_embd.weight" in edited) == (arch != "gemma2")
    assert any(".attn_output." in n for n in edited) and any(".ffn_down" in n for n in edited)
    for name, digest in before.items():
        if name not in edited:
            assert after[name] == digest, name  # byte for byte
        else:
            assert after[name][0] == digest[0] and after[name][1] != digest[1], name  # same type, new values
    if "output.weight" not in before and arch != "gemma2":  # tied: the original embedding is the new head
        assert after["output.weight"] == before["token_embd.weight"]
    assert _tensor_hashes(source) == before  # the source is only read
    report = _verify(reference, out, None if arch == "gemma2" else run)
    assert report.passed and report.mean_kl <= GGUF_TOLERANCES["F32"][0], report.to_dict()


def test_quantized_source_keeps_types_and_falls_back(tiny_model_factory, tmp_path):
    """A q8_0 source: edited tensors are requantized to q8_0 with llama.cpp's quantizer; ``--edited-type-always``."""
    folder = tiny_model_factory("qwen2", bias=True)
    f32 = tmp_path / "f32.gguf"
    convert_folder(folder, f32, "f32")
    from cosmic_bake.export.ggml_quant import quantize_file

    source = tmp_path / "q8.gguf"
    quantize_file(f32, source, "q8_0", threads=1)
    run = _run_dir(folder, tmp_path)
    bake = bake_to_gguf(str(source), run, tmp_path / "a.gguf")
    assert set(bake["types"].values()) <= {"Q8_0 -> Q8_0", "F32 -> F32"}
    assert not bake["requantized_as_other_type"]
    bake = bake_to_gguf(str(source), run, tmp_path / "b.gguf", edited_type="f16", edited_type_always=True)
    assert bake["requantized_as_other_type"] and all(
        v.endswith("F16") for k, v in bake["types"].items() if k.endswith("weight")
    )
    report = _verify(folder, tmp_path / "a.gguf", run)
    assert report.passed and report.weight_type == "8-bit", report.to_dict()


# --------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def _fails(args: list[str], expect: str) -> str:
    """The command raises one user error (``cli.main`` prints it as one line and exits 2)."""
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, CosmicBakeError), result.output + repr(result.exception)
    line = str(result.exception)
    assert "\n" not in line and expect in line, line
    return line


def _nothing_left(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep


def test_bad_gguf_inputs(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    run = _run_dir(folder, tmp_path)
    good = tmp_path / "good.gguf"
    convert_folder(folder, good, "f32")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04 this is a zip file, not a model")
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = str(outdir / "x.gguf")
    _fails(["bake", str(truncated), "--direction", str(run), "--format", "gguf", "-o", out], "not a complete GGUF")
    _fails(["bake", str(foreign), "--direction", str(run), "--format", "gguf", "-o", out], "not a GGUF file")
    # an output type that cannot hold rows of 64 values (K-quants pack 256)
    _fails(
        [
            "bake",
            str(good),
            "--direction",
            str(run),
            "--format",
            "gguf",
            "--edited-type",
            "q4_k",
            "--edited-type-always",
            "-o",
            out,
        ],
        "blocks of 256",
    )
    _fails(["bake", str(good), "--direction", str(run), "--format", "gguf", "-o", str(outdir / "x.bin")], ".gguf")
    _nothing_left(outdir, set())
    # an architecture this llama.cpp lacks (a GGUF claiming one)
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "alien.gguf"), "no-such-arch")
    w.add_uint32("no-such-arch.embedding_length", 64)
    w.add_tensor("token_embd.weight", torch.zeros(8, 64).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _fails(
        ["bake", str(tmp_path / "alien.gguf"), "--direction", str(run), "--format", "gguf", "-o", out],
        "'no-such-arch' is not supported",
    )
    _nothing_left(outdir, set())
    # existing output without --force
    (outdir / "x.gguf").write_bytes(b"keep me")
    _fails(["bake", str(good), "--direction", str(run), "--format", "gguf", "-o", out], "--force")
    assert (outdir / "x.gguf").read_bytes() == b"keep me"
    _nothing_left(outdir, {"x.gguf"})


@pytest.mark.parametrize("outtype", ["q4_0", "q4_1"])
def test_four_bit_gguf_runs_in_llama_cpp_and_verifies(outtype, tiny_model_factory, tmp_path, monkeypatch):
    """4-bit files run in llama.cpp on every CPU, within verify's 4-bit KL gate and its relative gate.

    On CPUs with Intel AMX the PyPI build of llama-cpp-python puts Q4 weights in AMX buffers and
    crashes (SIGSEGV in ``ggml_backend_amx_mul_mat``) on the first decode; ``open_llama`` loads
    them without those buffers. Run in a child process, so a crash fails this test, not the suite.
    A random tiny model's near-uniform logits flip under 4-bit rounding, so its top-1 agreement
    misses the 4-bit gate: that is the only failure verify may report here (exit 1 then).
    """
    import subprocess
    import sys

    from test_verify_gates import _strong_run

    from cosmic_bake.verify.logits import RATIO_MAX

    monkeypatch.setenv("COSMIC_BAKE_MODELS", str(tmp_path / "cache"))
    folder = tiny_model_factory("llama", hidden_size=256, intermediate_size=512)
    run = _strong_run(folder, tmp_path)
    out = tmp_path / f"m-{outtype}.gguf"
    bake_to_gguf(str(folder), run, out, outtype=outtype)
    report = tmp_path / "verify.json"
    cmd = [sys.executable, "-m", "cosmic_bake.cli", "verify", str(folder), str(out)]
    cmd += ["--direction", str(run), "--limit", "2", "-o", str(report)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), f"exit {done.returncode}: {done.stdout[-1500:]} {done.stderr[-1500:]}"
    result = json.loads(report.read_text())
    assert result["runtime"] == "llama.cpp" and result["weight_type"] == "4-bit"
    assert 0 < result["mean_kl"] <= GGUF_TOLERANCES["4-bit"][0] and result["ratio"] <= RATIO_MAX
    assert done.returncode == (0 if result["passed"] else 1)
    assert all(reason.startswith("top-1 agreement") for reason in result["reasons"]), result["reasons"]


def test_header_metadata_equals_gguf_py(tmp_path):
    """The header-only reader (provenance reads a few general.* keys) gives gguf-py's values for every
    key kind: strings, string and number arrays, integers of each width, floats and booleans."""
    import numpy as np
    from gguf import GGUFWriter

    from cosmic_bake.export.gguf_io import read_metadata

    path = tmp_path / "kinds.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_name("A model")
    w.add_string("general.source.repo_url", "https://huggingface.co/owner/name")
    w.add_array("tokenizer.ggml.tokens", ["a", "bé", "", "long token"])
    w.add_array("general.tags", ["x", "y"])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.25])
    w.add_uint8("k.u8", 7)
    w.add_int16("k.i16", -3)
    w.add_uint32("k.u32", 2**31)
    w.add_int64("k.i64", -(2**40))
    w.add_uint64("k.u64", 2**50)
    w.add_float64("k.f64", 0.1)
    w.add_float32("k.f32", 1.5)
    w.add_bool("k.bool", True)
    w.add_tensor("t", np.zeros((2, 3), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = open_gguf(path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert read_metadata(path) == expected
    assert read_metadata(path, "general.") == {k: v for k, v in expected.items() if k.startswith("general.")}
    assert read_metadata(path, "k.")["k.u64"] == 2**50
