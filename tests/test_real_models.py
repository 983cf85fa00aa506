"""Integration on the two real chat models (fetched from PyPI by the project's own builtin loader).

Slow-ish (a minute or two each on 2 cores): real GGUF -> transformers loading, the real chat
templates, selection, hooks, generation, baking and loading the baked folder in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cosmic_bake.cli import cli
from cosmic_bake.model.llamacpp import open_llama

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "cosmic-qwen2.5-coder-0.5b-lce"
SMOL = "builtin:smollm2-135m-instruct"
QWEN = "builtin:qwen2.5-coder-0.5b-instruct"


def _ok(args: list[str]):
    result = CliRunner().invoke(cli, args, catch_exceptions=True)
    assert result.exit_code == 0, result.output[-2000:] + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("smol") / "run"
    _ok(["select", SMOL, "-o", str(run), "--limit", "16", "--limit-val", "2"])
    return run


def test_smollm2_select_eval_bake_verify(smol_run, tmp_path):
    sel = json.loads((smol_run / "selection.json").read_text())
    # SmolLM2's tokenizer splits "assistant" in two: the positions come from the template's tokens
    assert sel["positions"] == {
        "-6": "<|im_end|>",
        "-5": "\n",
        "-4": "<|im_start|>",
        "-3": "ass",
        "-2": "istant",
        "-1": "\n",
    }
    assert len(sel["candidates"]) == 6 * 30 and len(sel["eval_layers"]) == 3
    report = tmp_path / "eval.json"
    _ok(
        [
            "eval",
            SMOL,
            "--direction",
            str(smol_run),
            "--limit-harmful",
            "4",
            "--limit-harmless",
            "4",
            "--max-new-tokens",
            "12",
            "-o",
            str(report),
        ]
    )
    data = json.loads(report.read_text())
    assert data["harmless_kl"] is not None and data["harmless_kl"] >= 0
    baked = tmp_path / "baked"
    _ok(["bake", SMOL, "--direction", str(smol_run), "--format", "hf", "-o", str(baked)])
    config = json.loads((baked / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # SmolLM2 ties; the original head is kept
    verify_json = tmp_path / "verify.json"
    _ok(["verify", SMOL, str(baked), "--direction", str(smol_run), "--limit", "4", "-o", str(verify_json)])
    v = json.loads(verify_json.read_text())
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["max_kl"] <= 1e-6
    # stock transformers in a fresh interpreter loads the folder and generates
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]);"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True,"
        " return_tensors='pt', return_dict=True);"
        "out = m.generate(**ids, max_new_tokens=5, do_sample=False); print(out.shape[1] > ids['input_ids'].shape[1])"
    )
    done = subprocess.run([sys.executable, "-c", code, str(baked)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("True"), done.stderr[-2000:]


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="needs ../shared/reference")
def test_qwen_candidates_and_eval_layers_match_official_code():
    """The float64 difference-in-means candidates and L_low equal the official COSMIC output."""
    from cosmic_bake.math.scores import eval_layers
    from cosmic_bake.model.architecture import probe
    from cosmic_bake.model.chat import ChatFormat, read_template_option
    from cosmic_bake.model.loading import load_model
    from cosmic_bake.select.candidates import Batches, collect_candidates

    lm = load_model(QWEN)
    arch = probe(lm.model)
    fmt = ChatFormat(
        lm.tokenizer, read_template_option(r"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
    )

    def load(name):
        return [x["instruction"] for x in json.loads((REFERENCE / f"{name}.json").read_text())]

    cands = collect_candidates(
        lm.model, arch, fmt, Batches.make(fmt, load("harmful_train"), 32), Batches.make(fmt, load("harmless_train"), 32)
    )
    ref = load_file(str(REFERENCE / "candidates.safetensors"))["mean_diffs"]
    assert cands.directions.shape == ref.shape == (5, 24, 896)
    assert float((cands.directions - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    ranked = json.loads((REFERENCE / "eval_layers_ranked.json").read_text())["ranked_layers"]
    assert eval_layers(cands.similarities) == ranked[:2] == [19, 18]
    torch.testing.assert_close(torch.tensor(eval_layers(cands.similarities, 24)), torch.tensor(ranked), rtol=0, atol=0)


def test_smollm2_q4_1_gguf_bake_verify_and_chat_in_llama_cpp(smol_run, tmp_path):
    """Q4_1 GGUF in, GGUF out: untouched tensors byte-identical, verify in llama.cpp, llama.cpp chat."""
    import hashlib

    from cosmic_bake.export.gguf_io import open_gguf
    from cosmic_bake.model.builtin import fetch_builtin

    out = tmp_path / "smol-baked.gguf"
    _ok(["bake", SMOL, "--direction", str(smol_run), "--format", "gguf", "-o", str(out)])
    manifest = json.loads((tmp_path / "smol-baked.gguf.manifest.json").read_text())
    assert manifest["bake"]["route"] == "gguf-to-gguf" and manifest["files"]["smol-baked.gguf"]

    def hashes(path):
        return {t.name: hashlib.sha256(bytes(t.data)).hexdigest() for t in open_gguf(path).tensors}

    src, baked = hashes(fetch_builtin("smollm2-135m-instruct")), hashes(out)
    edited = set(manifest["bake"]["types"])
    assert len(edited) == 1 + 2 * 30  # embedding, 30 attention outputs, 30 MLP down projections
    assert all(baked[n] == h for n, h in src.items() if n not in edited)
    assert baked["output.weight"] == src["token_embd.weight"]  # tied: the original head is kept
    verify_json = tmp_path / "verify.json"
    args = ["verify", SMOL, str(out), "--direction", str(smol_run), "--limit", "2", "-o", str(verify_json)]
    fail = CliRunner().invoke(cli, args, catch_exceptions=True)
    v = json.loads(verify_json.read_text())
    # Q4_1 re-rounding of the edited tensors undoes much of the edit on this model: verify says so
    assert fail.exit_code == 1 and not v["passed"] and v["ratio"] > v["ratio_max"], fail.output[-2000:]
    assert v["unedited_reference"]["kind"] == "source GGUF" and "--edited-type-always" in fail.output
    always = tmp_path / "smol-always.gguf"
    _ok(["bake", SMOL, "--direction", str(smol_run), "--format", "gguf", "--edited-type-always", "-o", str(always)])
    verify_always = tmp_path / "verify-always.json"
    _ok(["verify", SMOL, str(always), "--direction", str(smol_run), "--limit", "2", "-o", str(verify_always)])
    v = json.loads(verify_always.read_text())
    assert v["passed"] and v["runtime"] == "llama.cpp" and v["runtime_floor"]["mean_kl"] > 0
    assert v["ratio"] <= v["ratio_max"]
    llm = open_llama(out, n_ctx=256, verbose=False)  # stock Llama, minus llama.cpp's AMX buffers
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0
    )
    assert reply["choices"][0]["message"]["content"].strip()
