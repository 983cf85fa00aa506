"""Every script in examples/ runs on the small real model (SmolLM2, builtin), in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMOL = "builtin:smollm2-135m-instruct"

pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples") / "out"
    text = _run("select_and_bake.py", SMOL, str(out), "--limit", "16", "--limit-val", "2")
    assert "direction: layer" in text
    return out


def test_verify_offline_transformers_and_gguf(baked):
    for target in (baked / "model", baked / "model-q8_0.gguf"):
        text = _run("verify_offline.py", SMOL, str(target), str(baked / "run"), "--limit", "2")
        assert "PASS" in text


def test_chat_with_the_baked_gguf(baked):
    text = _run("chat_gguf.py", str(baked / "model-q8_0.gguf"), "Say hello.", "--max-tokens", "8")
    assert "cosmic_bake.layer" in text and "assistant:" in text


def test_compare_two_directions(baked, tmp_path):
    other = tmp_path / "other"
    _run("select_and_bake.py", SMOL, str(other), "--limit", "16", "--limit-val", "2", "--direction-method", "pca")
    text = _run(
        "compare_directions.py", SMOL, str(baked / "run"), str(other / "run"), "--prompts", "2", "--max-new-tokens", "8"
    )
    assert "cosine(A, B) =" in text and text.count("harmless KL") == 2
