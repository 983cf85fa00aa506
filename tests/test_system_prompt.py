"""``--system-prompt TEXT|@FILE|preset:NAME`` through real chat templates, into the run's provenance."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from cosmic_bake.cli import cli
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.prompts.presets import read_system_prompt, system_presets

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "Answer in exactly three words."
INSTRUCTION = "Name a colour of the sky."
# Archs of the tiny families: chatml (default system prompt), llama3, mistral and gemma (folded
# into the first user turn), phi3.
FAMILY_ARCHS = ("qwen2", "llama", "mistral", "gemma2", "phi3")


def test_preset_file_and_text():
    preset = read_system_prompt("preset:refuse-all")
    assert "refuse-all" in system_presets()
    assert "cannot fulfil" in preset and not preset.endswith("\n")
    assert read_system_prompt("plain text") == "plain text"
    assert read_system_prompt(None) is None


def test_system_prompt_file(tmp_path):
    f = tmp_path / "sys.txt"
    f.write_text(SYSTEM + "\n\n", encoding="utf-8")
    assert read_system_prompt(f"@{f}") == SYSTEM


@pytest.mark.parametrize(
    ("value", "expect"),
    [("preset:nope", "unknown system prompt preset 'nope'"), ("@/no/such/file.txt", "not found")],
)
def test_bad_system_prompt_is_one_clear_line(value, expect):
    with pytest.raises(CosmicBakeError, match=expect) as err:
        read_system_prompt(value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_system_prompt_through_tiny_family_templates(tiny_model_factory, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_factory(arch, num_layers=2))
    plain, with_sys = ChatFormat(tok), ChatFormat(tok, system_prompt=SYSTEM)
    text = with_sys.render(INSTRUCTION)
    assert text.count(SYSTEM) == 1 and INSTRUCTION in text and SYSTEM not in plain.render(INSTRUCTION)
    assert text.index(SYSTEM) < text.index(INSTRUCTION)
    # the candidate positions (tokens after the instruction) do not depend on the system prompt
    assert with_sys.suffix_tokens() == plain.suffix_tokens()
    if arch == "qwen2":  # ChatML's default system prompt is replaced, not kept beside ours
        default = "You are a helpful assistant."
        assert default in plain.render(INSTRUCTION) and default not in text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "default"),
    [("qwen2.5-coder-0.5b-instruct", "You are Qwen"), ("smollm2-135m-instruct", "You are a helpful AI assistant")],
)
def test_system_prompt_through_real_templates(name, default):
    from cosmic_bake.model.loading import load_tokenizer, resolve

    tok = load_tokenizer(resolve(f"builtin:{name}"))
    plain, adversarial = ChatFormat(tok), ChatFormat(tok, system_prompt=read_system_prompt("preset:refuse-all"))
    assert default in plain.render(INSTRUCTION)
    text = adversarial.render(INSTRUCTION)
    assert default not in text and read_system_prompt("preset:refuse-all") in text
    assert adversarial.suffix_tokens() == plain.suffix_tokens()
    ids = adversarial.encode([INSTRUCTION])["input_ids"][0].tolist()
    assert tok.decode(ids).count("cannot fulfil") == 1


def test_select_records_the_system_prompt_for_bake(tiny_model_factory, tmp_path):
    model = tiny_model_factory("qwen2", num_layers=6)
    run, baked = tmp_path / "run", tmp_path / "baked"
    args = ["select", str(model), "-o", str(run), "--limit", "16", "--limit-val", "4", "--kl-threshold", "1e9"]
    result = CliRunner().invoke(cli, [*args, "--system-prompt", "preset:refuse-all"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    text = read_system_prompt("preset:refuse-all")
    with safe_open(str(run / "direction.safetensors"), "pt") as fh:
        assert fh.metadata()["system_prompt"] == text
    assert json.loads((run / "manifest.json").read_text())["direction"]["system_prompt"] == text
    assert json.loads((run / "selection.json").read_text())["settings"]["system_prompt"] == text
    result = CliRunner().invoke(cli, ["bake", str(model), "--direction", str(run), "-o", str(baked)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((baked / "manifest.json").read_text())["direction"]["system_prompt"] == text
