"""Malformed JSON that cosmic-bake reads back (shard index, bake manifest, run stamp): exit 2, one line.

Each of these files is written by a tool but can be truncated by a full disk, merged by hand or
replaced by something else; the CLI must say which file and what to do, not print a traceback.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from tiny_models import random_direction_run

pytestmark = pytest.mark.usefixtures("one_thread")

# truncated, not an object, an object of the wrong shape
MALFORMED = ['{"metadata": {}, "weight_map": {"model.embed', "[1, 2, 3]", '{"weight_map": ["model-1.safetensors"]}']


def _direction_dir(folder: Path, tmp: Path) -> Path:
    return random_direction_run(folder, tmp / "run")


def _one_line_exit_2(monkeypatch, capsys, *args: object) -> str:
    """Run the real entry point (``cosmic-bake ARGS``): it must exit 2 with one ``error:`` line on stderr."""
    from cosmic_bake.cli import main

    capsys.readouterr()  # drop what building the fixtures printed
    monkeypatch.setattr(sys, "argv", ["cosmic-bake", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    assert done.value.code == 2, captured.err[-2000:]
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_shard_index(text, tiny_model_factory, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama", shard_size="100KB"), folder)
    (folder / "model.safetensors.index.json").write_text(text)
    line = _one_line_exit_2(
        monkeypatch, capsys, "bake", folder, "--direction", _direction_dir(folder, tmp_path), "-o", tmp_path / "out"
    )
    assert "model.safetensors.index.json" in line and "re-download" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", [*MALFORMED[:2], '{"bake": {"mode": "add", "alpha": "lots"}}'])
def test_malformed_bake_manifest(text, tiny_model_factory, tmp_path, monkeypatch, capsys):
    original = tiny_model_factory("llama")
    baked = tmp_path / "baked"
    shutil.copytree(original, baked)
    (baked / "manifest.json").write_text(text)
    run = _direction_dir(original, tmp_path)
    line = _one_line_exit_2(monkeypatch, capsys, "verify", original, baked, "--direction", run, "--limit", 1)
    assert str(baked / "manifest.json") in line and "bake the folder again" in line, line


@pytest.mark.parametrize("text", MALFORMED[:2])
def test_malformed_run_stamp(text, tiny_model_factory, tmp_path, monkeypatch, capsys):
    from cosmic_bake.recipe.file import load_recipe
    from cosmic_bake.recipe.runner import STAMPS, execute, plan_steps

    recipe = tmp_path / "tiny.toml"
    select = "[select]\nlimit = 8\nlimit_val = 4\nkl_threshold = 1e9\n"
    recipe.write_text(f'model = "{tiny_model_factory("llama")}"\n\n{select}[bake]\nformats = ["hf"]\n')
    out = tmp_path / "out"
    (out / STAMPS).mkdir(parents=True)
    stamp = out / STAMPS / "select.json"
    stamp.write_text(text)
    line = _one_line_exit_2(monkeypatch, capsys, "run", recipe, "-o", out)
    assert str(stamp) in line and "--fresh" in line, line
    # --fresh ignores stamps, so a broken one does not block the way out the message names
    loaded = load_recipe(recipe, [])
    steps = plan_steps(loaded, out)
    assert [r.status for r in execute(loaded, steps[:1], out, fresh=True, echo=lambda _: None)] == ["ran"]
    assert (out / "direction" / "direction.safetensors").is_file() and json.loads(stamp.read_text())["status"] == "ran"
