"""Outputs fit to share: nothing ``push`` uploads names a local folder, modes follow the umask, Hub cards.

For every kind of output (a baked transformers folder from a folder or a GGUF, a GGUF baked from
a GGUF or from a transformers folder, a LoRA folder, a ``run`` folder), the source is typed as a
relative path under a distinctive folder, the output is written under another, and ``HOME`` is a
third: no file of the push plan (its bytes, binary metadata included) may contain any of those
folders, relative as typed or absolute; files are 0644 and folders 0755 under umask 022; the
card's front matter parses with huggingface_hub's own model-card parser and has ``base_model``
when the source is a Hub id or a GGUF whose keys name one; a baked GGUF's ``general.name`` is not
its source's.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from tiny_models import random_direction_run

from cosmic_bake import api
from cosmic_bake.artifacts import Direction
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export.gguf_convert import convert_folder
from cosmic_bake.export.hub_push import check_shareable, plan_push, push
from cosmic_bake.export.lineage import gguf_keys
from cosmic_bake.outputs import atomic_dir, write_json
from cosmic_bake.sharing import local_paths_in, portable_text

pytestmark = pytest.mark.usefixtures("one_thread")

SRC, OUT, HOME = "srcdir-q7x", "outdir-q7x", "homedir-q7x"  # distinctive: found only where leaked


@pytest.fixture
def place(tmp_path, monkeypatch):
    """Work in ``tmp_path`` under umask 022 with a fake home (where the GGUF caches go)."""
    monkeypatch.chdir(tmp_path)
    home = tmp_path / HOME
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COSMIC_BAKE_MODELS", str(home / ".cache" / "cosmic-bake" / "models"))
    old = os.umask(0o022)
    yield tmp_path
    os.umask(old)


def _source(tiny_model_factory, place: Path, num_layers: int = 2) -> str:
    """A copy of a tiny qwen2 model under ``srcdir-q7x/`` (biases: the Qwen case), typed relative."""
    folder = tiny_model_factory("qwen2", bias=True, num_layers=num_layers)
    shutil.copytree(folder, place / SRC / "model")
    return f"{SRC}/model"


def _forbidden(place: Path) -> list[str]:
    """Every folder a leak would show: the typed names, and each absolute folder above them."""
    found = {SRC, OUT, HOME, str(Path.home())}
    for path in (place / SRC / "model", place / OUT):
        for parent in [path, *path.parents]:
            if len(parent.parts) > 2:  # not "/" or "/tmp": too common to mean a leak
                found.add(str(parent))
    return sorted(found)


def _assert_shareable(target: Path, place: Path) -> str:
    """No uploaded file mentions a forbidden folder; returns the card."""
    plan = plan_push(target)
    assert plan.local_paths == [] and not plan.record_paths
    check_shareable(plan)
    for f in plan.files:
        data = plan.card.encode() if f.local is None else f.local.read_bytes()
        for folder in _forbidden(place):
            assert folder.encode() not in data, f"{f.path_in_repo} holds {folder}"
    return plan.card


def _assert_modes(*paths: Path) -> None:
    for root in paths:
        for p in [root, *(root.rglob("*") if root.is_dir() else [])]:
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode == (0o755 if p.is_dir() else 0o644), f"{p}: {oct(mode)}"


def _front(card: str) -> dict:
    """The card's metadata as the Hub reads it (huggingface_hub parses the YAML, strictly)."""
    assert card.startswith("---\n")
    return ModelCard(card, ignore_metadata_errors=False).data.to_dict()


def _direction(place: Path) -> Path:
    """A direction run folder whose artifact names the model by its absolute path, as select used to."""
    run = random_direction_run(place / SRC / "model", place / "rundir" / "run")
    d = Direction.load(run)
    d.model_id = str(place / SRC / "model")
    d.save(run)
    return run


def _gguf_source(tiny_model_factory, place: Path) -> str:
    """The tiny model as a GGUF whose own keys name it and its Hub base (as convert_hf_to_gguf writes)."""
    folder = place / _source(tiny_model_factory, place)
    path = place / SRC / "tiny-q.gguf"
    keys = {
        "general.base_model.count": np.uint32(1),
        "general.base_model.0.name": "Tiny Base",
        "general.base_model.0.repo_url": "https://huggingface.co/Org/Tiny-Base",
        "general.license": "apache-2.0",
    }
    convert_folder(folder, path, "f32", metadata=keys, name="Tiny Chat")
    return f"{SRC}/tiny-q.gguf"


@pytest.mark.parametrize("kind", ["folder", "gguf"])
def test_hf_bake_is_fit_to_share(kind, tiny_model_factory, place):
    spec = _source(tiny_model_factory, place) if kind == "folder" else _gguf_source(tiny_model_factory, place)
    run = _direction(place)
    out = place / OUT / "baked"
    api.bake(spec, run, out, allow_mismatch=True)
    _assert_modes(out)
    card = _assert_shareable(out, place)
    assert re.search(r"\| tensors changed \| 4 weight matrices and 1 embedding, of \d+ tensors", card)
    front = _front(card)
    assert "cosmic-bake" in front["tags"]
    if kind == "gguf":  # the GGUF's own keys name its base and license
        assert front["base_model"] == "Org/Tiny-Base" and front["base_model_relation"] == "finetune"
        assert front["license"] == "apache-2.0"
    else:
        assert "base_model" not in front  # a plain folder names none, and none is guessed


def test_base_model_of_a_hub_source_and_of_the_option(tiny_model_factory, place, monkeypatch):
    """A Hub id source (its download stood in for by a local folder) is the card's base_model."""
    snapshot = place / _source(tiny_model_factory, place)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# Tiny\n", encoding="utf-8")
    monkeypatch.setattr("cosmic_bake.model.loading._hub_snapshot", lambda source: snapshot)
    run = random_direction_run(snapshot, place / "rundir" / "run")
    api.bake("Org/Tiny-Chat", run, place / OUT / "hub", allow_mismatch=True)
    front = _front((place / OUT / "hub" / "README.md").read_text())
    assert front["base_model"] == "Org/Tiny-Chat" and front["license"] == "mit"

    api.bake(f"{SRC}/model", run, place / OUT / "opt", allow_mismatch=True, base_model="Org/Named")
    assert _front((place / OUT / "opt" / "README.md").read_text())["base_model"] == "Org/Named"
    with pytest.raises(CosmicBakeError, match="not a Hub model id"):
        api.bake(f"{SRC}/model", run, place / OUT / "bad", base_model="/some/folder")


@pytest.mark.parametrize("route", ["gguf-to-gguf", "safetensors-to-gguf"])
def test_gguf_bake_is_fit_to_share(route, tiny_model_factory, place):
    if route == "gguf-to-gguf":
        spec = _gguf_source(tiny_model_factory, place)
        source_name = gguf_keys(place / spec)["general.name"]
    else:
        spec = _source(tiny_model_factory, place)
        source_name = "model"  # what a plain conversion of the folder is named
    run = _direction(place)
    out = place / OUT / "baked.gguf"
    bake = api.bake(
        spec, run, out, format="gguf", allow_mismatch=True, **({"outtype": "q8_0"} if "st" in route else {})
    )
    assert bake["route"] == route
    _assert_modes(out, out.with_name(out.name + ".manifest.json"))
    keys = gguf_keys(out)
    assert keys["general.name"] != source_name and keys["general.name"].startswith(source_name)
    assert "refusal direction removed" in keys["general.name"]
    assert keys["general.base_model.count"] == 1 and keys["general.base_model.0.name"] == source_name
    front = _front(_assert_shareable(out, place))
    if route == "gguf-to-gguf":
        assert keys["general.base_model.0.repo_url"] == "https://huggingface.co/Org/Tiny-Base"
        assert front["base_model"] == "Org/Tiny-Base" and front["base_model_relation"] == "finetune"
    assert "gguf" in front["tags"]


def test_lora_is_fit_to_share(tiny_model_factory, place):
    spec = _source(tiny_model_factory, place)
    run = _direction(place)
    out = place / OUT / "lora"
    api.export_lora(spec, run, out, gguf=True, allow_mismatch=True)
    _assert_modes(out)
    assert "base_model" not in _front(_assert_shareable(out, place))
    api.export_lora(spec, run, place / OUT / "lora2", allow_mismatch=True, base_model="Org/Tiny-Chat")
    front = _front((place / OUT / "lora2" / "README.md").read_text())
    assert front["base_model"] == "Org/Tiny-Chat" and front["base_model_relation"] == "adapter"
    config = (place / OUT / "lora2" / "adapter_config.json").read_text()
    assert '"base_model_name_or_path": "Org/Tiny-Chat"' in config


def test_run_is_fit_to_share(tiny_model_factory, place):
    from click.testing import CliRunner

    from cosmic_bake.cli import cli

    spec = _source(tiny_model_factory, place, num_layers=4)  # enough layers for select's filters
    recipe = place / "tiny.toml"
    recipe.write_text(
        f'model = "{spec}"\n[select]\nlimit = 8\nlimit_val = 4\nkl_threshold = 1e9\n'
        '[bake]\nformats = ["hf", "gguf"]\ngguf_outtypes = ["q8_0"]\n[verify]\nlimit = 2\n'
        "[eval]\nlimit_harmful = 2\nlimit_harmless = 2\nmax_new_tokens = 2\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", f"{OUT}/run"])
    assert result.exit_code == 0, result.output[-2000:] + repr(result.exception)
    out = place / OUT / "run"
    _assert_modes(*(p for p in out.iterdir() if p.name != ".stamps"))
    assert "Verification and evaluation" in _assert_shareable(out, place)


def test_push_refuses_a_card_or_manifest_with_a_local_path(tiny_model_factory, place, monkeypatch):
    spec = _source(tiny_model_factory, place)
    run = _direction(place)
    out = place / OUT / "baked"
    api.bake(spec, run, out, allow_mismatch=True)
    card = out / "README.md"
    card.write_text(card.read_text() + f"\nMade from {place / SRC / 'model'}.\n")
    plan = plan_push(out)
    assert [where for where, _ in plan.local_paths] == ["README.md"]
    with pytest.raises(CosmicBakeError) as err:
        check_shareable(plan)
    assert "README.md holds the local path" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # refused before any token or network is used
    with pytest.raises(CosmicBakeError, match="holds the local path"):
        push(plan, "someone/x", message="m")

    # made with record_paths: the manifest says so, and push lets the paths go
    kept = place / OUT / "kept"
    api.bake(spec, run, kept, allow_mismatch=True, record_paths=True)
    plan = plan_push(kept)
    assert plan.record_paths and any(where == "manifest.json" for where, _ in plan.local_paths)
    check_shareable(plan)


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            write_json(tmp / "sub" / "a.json", {})
            (tmp / "b.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]}
    assert modes == {"out": 0o750, "sub": 0o750, "a.json": 0o640, "b.bin": 0o640}


def test_portable_text_keeps_what_is_not_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"")
    absolute = str(tmp_path / "models" / "m.gguf")
    assert portable_text(absolute) == "m.gguf" and portable_text("models/m.gguf") == "m.gguf"
    assert portable_text(f'model="{absolute}"') == 'model="m.gguf"'
    assert portable_text("~/x/y.gguf") == "y.gguf"
    for kept in ("/no_think", "</s>{{ x }}", "Qwen/Qwen2.5-0.5B", "https://huggingface.co/a/b", "builtin:harmful"):
        assert portable_text(kept) == kept
    assert local_paths_in(f"from {absolute}, at 3 tokens/s with /no_think") == [absolute]
