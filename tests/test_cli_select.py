"""The select and eval commands end to end on tiny models, and every bad input of issue 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cosmic_bake.cli import cli
from cosmic_bake.errors import CosmicBakeError

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=True)


def _select_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["select", str(model), "-o", str(out), "--limit", "24", "--limit-val", "6", "--kl-threshold", "1e9", *extra]


def test_select_writes_a_complete_run(tiny_model_factory, tmp_path):
    model = tiny_model_factory("qwen2", num_layers=10)
    out = tmp_path / "run"
    result = _run(_select_args(model, out))
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert {"direction.safetensors", "selection.json", "manifest.json", "layer_similarities.png", "scores.png"} <= {
        p.name for p in out.iterdir()
    }
    sel = json.loads((out / "selection.json").read_text())
    assert len(sel["candidates"]) == len(sel["positions"]) * 10 and len(sel["positions"]) >= 5
    assert set(sel["candidates"][0]) == {"position", "layer", "s_comply", "s_refuse", "kl", "kept", "reason"}
    assert sel["eval_layers"] and {"position", "layer"} == set(sel["chosen"])
    assert {"candidates", "scoring"} <= set(sel["timings"])
    assert sel["prompt_sampling"]["harmless train"] == {"from": 128, "kept": 24, "how": "first"}
    assert 1 <= sel["kl_computed"]["candidates"] < sel["kl_computed"]["of"] == len(sel["candidates"])
    tensors = load_file(str(out / "direction.safetensors"))
    assert tensors["direction"].shape == (64,) and tensors["reference"].shape == (64,)
    with safe_open(str(out / "direction.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert int(meta["layer"]) == sel["chosen"]["layer"] and int(meta["position"]) == sel["chosen"]["position"]
    assert meta["mode"] == "ablate" and meta["selector"] == "cosmic"
    chosen = next(c for c in sel["candidates"] if (c["position"], c["layer"]) == tuple(sel["chosen"].values()))
    assert chosen["kept"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["direction"]["layer"] == sel["chosen"]["layer"]
    assert "model.safetensors" in manifest["source_model"]["files"]
    # an existing run is not replaced without --force
    again = _run(_select_args(model, out))
    assert again.exit_code != 0 and "already exists" in str(again.exception)


def test_refusal_score_selector_and_affine_mode(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama", num_layers=5)
    out = tmp_path / "rs"
    result = _run(_select_args(model, out, "--selector", "refusal-score", "--mode", "affine"))
    if result.exit_code != 0:
        # A random model never starts with "I"/"As", so Arditi's steering filter (score >= 0) may
        # remove everything; that must be the clean, explained error and nothing written.
        assert "steering score" in _error(result) and not out.exists()
        return
    sel = json.loads((out / "selection.json").read_text())
    assert {"refusal_score", "steering_score", "kl"} <= set(sel["candidates"][0])
    assert sel["mode"] == "affine"


def test_refusal_log_odds_formula():
    from cosmic_bake.select.scoring import refusal_log_odds

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(logits.double(), -1)[:, [0, 2]].sum(-1)
    expected = torch.log(p + 1e-8) - torch.log(1 - p + 1e-8)
    torch.testing.assert_close(refusal_log_odds(logits, [0, 2]), expected)


def test_eval_with_hook_reports_rates_and_kl(tiny_model_factory, tmp_path):
    model = tiny_model_factory("qwen2", num_layers=10)
    run = tmp_path / "run"
    assert _run(_select_args(model, run)).exit_code == 0
    report = tmp_path / "eval.json"
    result = _run(
        [
            "eval",
            str(model),
            "--direction",
            str(run),
            "--limit-harmful",
            "4",
            "--limit-harmless",
            "4",
            "--max-new-tokens",
            "4",
            "-o",
            str(report),
        ]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads(report.read_text())
    assert data["n_harmful"] == 4 and data["n_harmless"] == 4 and data["intervention"] == "remove"
    assert 0.0 <= data["harmful_refusal_rate"] <= 1.0 and data["harmless_kl"] >= 0.0
    assert len(data["completions"]["harmful"]) == 4


# --- bad input: one clear line, non-zero exit, nothing that looks like a finished run ---------


def _error(result) -> str:
    assert result.exit_code != 0
    assert isinstance(result.exception, CosmicBakeError), repr(result.exception)
    text = str(result.exception)
    assert "\n" not in text and ";" in text  # problem; fix
    return text


def test_missing_model_file(tmp_path):
    out = tmp_path / "run"
    assert "not found" in _error(_run(_select_args(tmp_path / "nope.gguf", out)))
    assert not out.exists()


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    out = tmp_path / "run"
    msg = _error(_run(_select_args(bad, out)))
    assert "broken.gguf" in msg
    assert not out.exists()


def test_tokenizer_without_chat_template(tiny_model_factory, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_model_factory("llama", num_layers=5), folder)
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "--chat-template" in _error(_run(_select_args(folder, tmp_path / "run")))
    # and the override makes it work
    ok = _run(_select_args(folder, tmp_path / "run2", "--chat-template", "User: {instruction}\\nAssistant:"))
    assert ok.exit_code == 0, repr(ok.exception)


@pytest.mark.parametrize(
    ("content", "expect"),
    [("", "empty"), ("[1, 2", "JSON"), ('[{"text": "a"}, {"text": "b"}]', "column")],
)
def test_bad_prompt_files(tiny_model_factory, tmp_path, content, expect):
    f = tmp_path / "p.json"
    f.write_text(content)
    args = _select_args(tiny_model_factory("llama", num_layers=5), tmp_path / "run", "--harmful", str(f))
    if expect == "column":
        args += ["--column", "prompt"]
    msg = _error(_run(args))
    assert expect.lower() in msg.lower() and "p.json" in msg
    assert not (tmp_path / "run").exists()


def test_too_few_prompts(tiny_model_factory, tmp_path):
    f = tmp_path / "few.txt"
    f.write_text("one\ntwo\nthree\n")
    msg = _error(_run(_select_args(tiny_model_factory("llama", num_layers=5), tmp_path / "run", "--harmful", str(f))))
    assert "prompts" in msg


def test_nan_activations(tiny_model_factory, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(tiny_model_factory("llama", num_layers=5), folder)
    weights = load_file(str(folder / "model.safetensors"))
    key = next(k for k in weights if k.endswith("layers.1.mlp.down_proj.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    msg = _error(_run(_select_args(folder, tmp_path / "run")))
    assert "NaN" in msg and not (tmp_path / "run").exists()


def test_no_candidate_survives(tiny_model_factory, tmp_path):
    args = _select_args(tiny_model_factory("qwen2", num_layers=10), tmp_path / "run")
    args[args.index("--kl-threshold") + 1] = "-1"
    msg = _error(_run(args))
    assert "no candidate survived" in msg and "KL" in msg
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run*"))


def test_console_error_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cosmic_bake.cli", "select", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model not found")
