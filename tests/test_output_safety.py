"""The output rule (issue 13): no command's -o may touch an input, and --force replaces only the tool's own outputs.

Every writing command runs through the real CLI on real files: ``-o`` equal to, containing or
inside each kind of input it takes (model folder, model .gguf file, direction run folder, prompt
file, the eval --kl-against model, the recipe) is refused with and without ``--force`` and the
inputs stay byte-identical; ``--force`` over something cosmic-bake did not write is refused and
left as it was, over an empty folder or an earlier cosmic-bake output of the same kind it works.
The refusals happen before any model is loaded, so the matrix is cheap.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import random_direction_run

from cosmic_bake.cli import cli
from cosmic_bake.errors import CosmicBakeError

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN = 64  # tests/tiny_models.py


# --------------------------------------------------------------------------------------------
# Inputs on disk, each in its own box folder so "contains" names one input


@pytest.fixture(scope="module")
def templates(tiny_model_factory, tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder, its f32 GGUF, a direction run folder and a prompt file (copied per test)."""
    from cosmic_bake.export.gguf_convert import convert_folder

    folder = tiny_model_factory("llama", num_layers=4)
    root = tmp_path_factory.mktemp("safety_templates")
    gguf = root / "llama.gguf"
    convert_folder(folder, gguf, "f32")
    run = random_direction_run(folder, root / "run")
    prompts = root / "harmful.txt"
    prompts.write_text("\n".join(f"How do I pick lock number {i}?" for i in range(40)) + "\n", encoding="utf-8")
    return {"folder": folder, "gguf": gguf, "run": run, "prompts": prompts}


class World:
    """Fresh copies of the inputs under ``root/in`` (hashed whole) and a free area ``root/out``."""

    def __init__(self, root: Path, templates: dict[str, Path]) -> None:
        self.inputs = root / "in"
        self.out = root / "out"
        self.out.mkdir(parents=True)
        self.model = self._box("model", templates["folder"], "llama")
        self.gguf = self._box("gguf", templates["gguf"], "llama.gguf")
        self.run = self._box("run", templates["run"], "run")
        self.prompts = self._box("prompts", templates["prompts"], "harmful.txt")
        self.recipe = self.inputs / "box_recipe" / "recipe.toml"
        self.recipe.parent.mkdir(parents=True)
        self.recipe.write_text(recipe_text(self.model, self.prompts), encoding="utf-8")

    def _box(self, name: str, src: Path, leaf: str) -> Path:
        dst = self.inputs / f"box_{name}" / leaf
        dst.parent.mkdir(parents=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst


def recipe_text(model: Path, prompts: Path | None = None) -> str:
    harmful = f'harmful = "{prompts}"\n' if prompts else ""
    return f"""model = "{model}"

[select]
{harmful}limit = 8
limit_val = 2
kl_threshold = 1e9

[bake]
formats = ["hf"]

[verify]
limit = 1

[eval]
baseline = false
limit_harmful = 1
limit_harmless = 1
max_new_tokens = 1
"""


@pytest.fixture
def world(tmp_path, templates) -> World:
    return World(tmp_path, templates)


def tree_state(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the hash of its bytes (folders as such): equal means untouched."""
    return {
        p.relative_to(root).as_posix(): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
    }


def invoke(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def refused(result) -> str:
    """The command failed with one user-facing line (the CLI prints it and exits 2)."""
    assert isinstance(result.exception, CosmicBakeError), result.output[-2000:] + repr(result.exception)
    text = str(result.exception)
    assert "\n" not in text and ";" in text, text  # problem; fix
    return text


def succeeded(result, codes: tuple[int, ...] = (0,)) -> None:
    assert result.exit_code in codes, result.output[-3000:] + repr(result.exception)


# --------------------------------------------------------------------------------------------
# Every writing command, with the inputs each takes

SMALL_GEN = ["--limit-harmful", "1", "--limit-harmless", "1", "--max-new-tokens", "1"]


def command(name: str, w: World, out: Path, kind: str = "folder") -> list:
    """argv of ``name`` writing ``out``; ``kind`` picks the model input (``gguf``: the .gguf file)."""
    model = w.gguf if kind == "gguf" else w.model
    bake = ["bake", model, "--direction", w.run, "-o", out]
    return {
        "select": ["select", model, "-o", out, "--harmful", w.prompts, "--limit", "8", "--limit-val", "2"]
        + ["--kl-threshold", "1e9"],
        "bake-hf": bake,
        "bake-gguf": [*bake, "--format", "gguf"],
        "bake-lora": [*bake, "--format", "lora"],
        "sweep": ["sweep", model, "--direction", w.run, "--harmful", w.prompts, "--alphas", "0,1", "-o", out]
        + SMALL_GEN,
        "compare": ["compare", model, "-o", out, "--harmful", w.prompts, "--limit", "8", "--limit-val", "2"]
        + ["--kl-threshold", "1e9", "--eval-harmful", w.prompts, "--eval-harmless", "builtin:harmless"]
        + ["--limit-eval-harmful", "1", "--limit-eval-harmless", "1", "--max-new-tokens", "1"],
        "eval": ["eval", w.gguf if kind in ("gguf", "kl-model") else w.model, "--direction", w.run]
        + ["--harmful", w.prompts, "--kl-against", w.model, "-o", out, *SMALL_GEN],
        "verify": ["verify", w.model, w.gguf if kind == "gguf" else w.model, "--direction", w.run]
        + ["--prompts", w.prompts, "--limit", "1", "-o", out],
        "run": ["run", w.recipe, "-o", out] if kind != "gguf" else ["run", w.recipe, "-o", out, "--model", w.gguf],
    }[name]


INPUTS_OF = {  # the kinds of input each command reads
    "select": ["folder", "gguf", "prompts"],
    "bake-hf": ["folder", "gguf", "run"],
    "bake-gguf": ["folder", "gguf", "run"],
    "bake-lora": ["folder", "gguf", "run"],
    "sweep": ["folder", "gguf", "run", "prompts"],
    "compare": ["folder", "gguf", "prompts"],
    "eval": ["folder", "gguf", "run", "prompts", "kl-model"],
    "verify": ["folder", "gguf", "run", "prompts"],
    "run": ["folder", "gguf", "prompts", "recipe"],
}
WRITES = {"bake-gguf": "x.gguf", "eval": "report.json", "verify": "report.json"}  # a file name; others folders


def input_path(w: World, kind: str) -> Path:
    return {"folder": w.model, "gguf": w.gguf, "run": w.run, "prompts": w.prompts, "kl-model": w.model}.get(
        kind, w.recipe
    )


CASES = [
    pytest.param(cmd, kind, relation, force, id=f"{cmd}-{kind}-{relation}{'-force' if force else ''}")
    for cmd, kinds in INPUTS_OF.items()
    for kind in kinds
    for relation in ("is", "contains", "inside")
    for force in ((False,) if cmd == "run" else (False, True))  # run resumes; it has no --force
]


@pytest.mark.parametrize(("cmd", "kind", "relation", "force"), CASES)
def test_output_may_not_be_contain_or_lie_inside_an_input(world, cmd, kind, relation, force):
    inp = input_path(world, kind)
    out = {"is": inp, "contains": inp.parent, "inside": inp / WRITES.get(cmd, "out")}[relation]
    before = tree_state(world.inputs)
    text = refused(invoke([*command(cmd, world, out, kind), *(["--force"] if force else [])]))
    expected = {"is": "is the input", "contains": "contains the input", "inside": "is inside the input"}[relation]
    assert expected in text and "--force to replace" not in text, text
    assert tree_state(world.inputs) == before


@pytest.mark.parametrize("case", ["chat-template", "system-prompt", "builtin", "hub"])
def test_template_system_prompt_builtin_and_hub_inputs(world, monkeypatch, case):
    """The rarer inputs: a chat template file, a system prompt @FILE, a builtin's cached file, a Hub cache folder."""
    extra = world.inputs / "box_extra"
    extra.mkdir()
    (extra / "keep.txt").write_text("keep", encoding="utf-8")
    if case == "chat-template":
        template = extra / "template.txt"
        template.write_text("Q: {instruction}\nA:", encoding="utf-8")
        argv, expect = [*command("select", world, template), "--chat-template", template], "is the input"
    elif case == "system-prompt":
        system = extra / "system.txt"
        system.write_text("You are careful.", encoding="utf-8")
        argv, expect = [*command("select", world, extra), "--system-prompt", f"@{system}"], "contains the input"
    elif case == "builtin":  # the cached file need not exist yet: -o may not be where it will be fetched to
        monkeypatch.setenv("COSMIC_BAKE_MODELS", str(extra / "models"))
        monkeypatch.setenv("PIP_NO_INDEX", "1")  # were the rule missing, the fetch would fail fast, not hang offline
        argv, expect = ["select", "builtin:smollm2-135m-instruct", "-o", extra], "contains the input"
    else:
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(extra))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        out = extra / "models--someone--some-model" / "run"
        argv, expect = ["select", "someone/some-model", "-o", out], "is inside the input"
    before = tree_state(world.inputs)
    text = refused(invoke([*argv, "--force"]))
    assert expect in text, text
    assert tree_state(world.inputs) == before


# --------------------------------------------------------------------------------------------
# The two data-loss cases of the issue


def test_bake_into_the_folder_holding_the_source_keeps_the_source(world):
    """``bake ./models/llama -o ./models --force`` used to bake, then delete the source."""
    src = world.model.parent
    before = tree_state(src)
    text = refused(invoke(["bake", world.model, "--direction", world.run, "-o", src, "--force"]))
    assert "contains the input" in text
    assert world.model.is_dir() and tree_state(src) == before


def test_select_force_over_a_users_folder_keeps_the_users_files(world):
    """``select MODEL -o ~/work --force`` used to replace the user's folder (all files gone) with a run."""
    work = world.out / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work", encoding="utf-8")
    text = refused(invoke([*command("select", world, work), "--force"]))
    assert "not a cosmic-bake output" in text and "--force replaces only" in text
    assert (work / "thesis.tex").read_text(encoding="utf-8") == "years of work"
    assert [p.name for p in work.iterdir()] == ["thesis.tex"]


# --------------------------------------------------------------------------------------------
# --force over things cosmic-bake did not write: refused, left intact


def _user_folder(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("mine", encoding="utf-8")


def _foreign_manifest(path: Path) -> None:
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"tool": "someone-else", "files": {}}), encoding="utf-8")


def _user_file(path: Path) -> None:
    path.write_text("a user's file", encoding="utf-8")


def _user_json(path: Path) -> None:
    path.write_text(json.dumps({"results": [1, 2, 3]}), encoding="utf-8")


def _plain_gguf(path: Path, w: World) -> None:
    shutil.copy2(w.gguf, path)  # a real GGUF, but without cosmic_bake.* keys or a sidecar


FOREIGN = {
    "folder": {"user-folder": _user_folder, "foreign-manifest": _foreign_manifest, "user-file": _user_file},
    "gguf": {"user-folder": _user_folder, "user-file": _user_file, "plain-gguf": _plain_gguf},
    "json": {"user-folder": _user_folder, "user-json": _user_json, "user-file": _user_file},
}
KIND_OF = {"bake-gguf": "gguf", "eval": "json", "verify": "json"}
FOREIGN_CASES = [
    pytest.param(cmd, name, id=f"{cmd}-{name}")
    for cmd in INPUTS_OF
    if cmd != "run"
    for name in FOREIGN[KIND_OF.get(cmd, "folder")]
]


@pytest.mark.parametrize(("cmd", "foreign"), FOREIGN_CASES)
def test_force_refuses_what_cosmic_bake_did_not_write(world, cmd, foreign):
    target = world.out / WRITES.get(cmd, "target")
    make = FOREIGN[KIND_OF.get(cmd, "folder")][foreign]
    make(target, world) if make is _plain_gguf else make(target)
    before = tree_state(world.out)
    text = refused(invoke([*command(cmd, world, target), "--force"]))
    assert str(target) in text and "--force replaces only" in text, text
    assert tree_state(world.out) == before


def test_force_refuses_a_tool_folder_holding_a_users_file(world):
    """A cosmic-bake output the user has since added a file to is no longer only the tool's."""
    out = world.out / "baked"
    succeeded(invoke(command("bake-hf", world, out)))
    (out / "my-notes.md").write_text("keep", encoding="utf-8")
    before = tree_state(world.out)
    text = refused(invoke([*command("bake-hf", world, out), "--force"]))
    assert "did not write (my-notes.md)" in text
    assert tree_state(world.out) == before


def test_force_refuses_a_baked_gguf_without_its_manifest(world):
    """Both marks are needed: the cosmic_bake.* keys and the sidecar manifest."""
    out = world.out / "x.gguf"
    succeeded(invoke(command("bake-gguf", world, out)))
    (out.parent / "x.gguf.manifest.json").unlink()
    before = tree_state(world.out)
    assert "manifest" in refused(invoke([*command("bake-gguf", world, out), "--force"]))
    assert tree_state(world.out) == before


def test_run_refuses_a_folder_that_is_not_a_run(world):
    target = world.out / "work"
    _user_folder(target)
    before = tree_state(world.out)
    assert "not a cosmic-bake run folder" in refused(invoke(command("run", world, target)))
    assert tree_state(world.out) == before


# --------------------------------------------------------------------------------------------
# --force over an empty folder and over an earlier output of the same kind: works


@pytest.mark.parametrize("cmd", [c for c in INPUTS_OF if c != "run"])
def test_force_replaces_an_empty_folder_then_its_own_output(world, cmd):
    target = world.out / WRITES.get(cmd, "target")
    target.mkdir()
    argv = [*command(cmd, world, target), "--force"]
    codes = (0, 1) if cmd == "verify" else (0,)  # verify of the unedited model against the hook: FAIL, exit 1
    succeeded(invoke(argv), codes)
    marker = target if target.is_file() else target / "manifest.json"
    assert marker.is_file()
    if KIND_OF.get(cmd) == "json":
        assert json.loads(target.read_text())["tool"] == "cosmic-bake"
    first = marker.stat().st_ino
    succeeded(invoke(argv), codes)  # over its own earlier output
    assert marker.is_file() and marker.stat().st_ino != first  # a new file renamed into place
    leftovers = [p.name for p in world.out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no temporary or moved-aside names left behind


def test_run_into_an_empty_folder_works_and_fresh_replaces_only_what_it_wrote(world):
    target = world.out / "run"
    target.mkdir()
    succeeded(invoke(command("run", world, target)))
    assert (target / "model" / "manifest.json").is_file() and (target / "summary.json").is_file()
    (target / "model" / "my-notes.md").write_text("keep", encoding="utf-8")  # the user adds a file to an export
    before = tree_state(target / "model")
    text = refused(invoke([*command("run", world, target), "--fresh"]))  # bake's --force meets the user's file
    assert "did not write (my-notes.md)" in text
    assert tree_state(target / "model") == before


# --------------------------------------------------------------------------------------------
# Symlinks and a target that changes while the bake runs


def test_symlinks_are_resolved_before_comparing(world):
    link = world.out / "link"
    link.symlink_to(world.model.parent, target_is_directory=True)  # -o names the source's box by a link
    before = tree_state(world.inputs)
    assert "contains the input" in refused(invoke([*command("bake-hf", world, link), "--force"]))
    model_link = world.out / "model-link"
    model_link.symlink_to(world.model, target_is_directory=True)  # the model given by a link, -o its real box
    argv = ["bake", model_link, "--direction", world.run, "-o", world.model.parent, "--force"]
    assert "contains the input" in refused(invoke(argv))
    assert tree_state(world.inputs) == before


def test_target_is_checked_again_before_it_is_replaced(world):
    """A user file that appears in the target during a long bake stops the replacement."""
    from cosmic_bake.outputs import atomic_dir

    out = world.out / "baked"
    succeeded(invoke(command("bake-hf", world, out)))
    with pytest.raises(CosmicBakeError, match="did not write"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new", encoding="utf-8")
            (out / "late.txt").write_text("written during the bake", encoding="utf-8")
    assert (out / "late.txt").is_file() and (out / "config.json").is_file()
    assert sorted(p.name for p in world.out.iterdir()) == ["baked"]  # the temporary folder is gone
