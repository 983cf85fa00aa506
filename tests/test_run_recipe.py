"""``cosmic-bake run RECIPE.toml``: every step, the summary, resuming, overrides and the shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cosmic_bake.cli import cli
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.recipe.file import load_recipe
from cosmic_bake.recipe.runner import plan_steps

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe(tmp_path: Path, model: Path, formats: str = '["hf", "gguf"]') -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(
        f"""
model = "{model}"
goal = "remove refusals"

[select]
limit = 12
limit_val = 4
kl_threshold = 1e9

[bake]
formats = {formats}
gguf_outtypes = ["q8_0"]

[verify]
limit = 2

[eval]
limit_harmful = 2
limit_harmless = 2
max_new_tokens = 2
""",
        encoding="utf-8",
    )
    return path


def _run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=True)


def test_run_recipe_end_to_end_then_resume(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama", num_layers=4)
    recipe, out = _recipe(tmp_path, model), tmp_path / "out"
    result = _run(["run", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output[-3000:] + repr(result.exception)
    assert (out / "direction" / "direction.safetensors").is_file()
    assert (out / "model" / "config.json").is_file() and (out / "gguf" / "model-q8_0.gguf").is_file()
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["export"]: r for r in summary["rows"]}
    assert set(rows) == {"hf", "gguf-q8_0", "unedited"}
    assert rows["hf"]["verify"]["passed"] and rows["gguf-q8_0"]["verify"]["passed"]
    assert rows["hf"]["eval"]["n_harmful"] == 2 and rows["hf"]["size_mib"] > 0
    assert [s["status"] for s in summary["steps"]] == ["ran"] * 8
    card = (out / "card.md").read_text()
    assert "## Verification and evaluation" in card and "| gguf-q8_0 | PASS |" in card
    assert "| output | size MiB |" in (out / "summary.md").read_text()
    assert "summary.md" in json.loads((out / "manifest.json").read_text())["files"]

    again = _run(["run", str(recipe), "-o", str(out)])
    assert again.exit_code == 0 and again.output.count("reused (inputs unchanged)") == 8

    changed = _run(["run", str(recipe), "-o", str(out), "--set", "verify.limit=3"])
    assert changed.exit_code == 0, changed.output[-2000:]
    steps = {s["name"]: s["status"] for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert steps["select"] == steps["bake-hf"] == "reused" and steps["verify-hf"] == "ran"


def test_run_loads_the_recipe_model_once(tiny_model_factory, tmp_path, monkeypatch):
    """select, verify (original side) and the evaluations share one loaded source model."""
    import cosmic_bake.model.loading as loading

    model = tiny_model_factory("llama", num_layers=4)
    loads: list[str] = []
    real = loading.load_model

    def counted(spec, *args, **kwargs):
        loads.append(str(spec))
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(loading, "load_model", counted)
    out = tmp_path / "out"
    result = _run(["run", str(_recipe(tmp_path, model)), "-o", str(out)])
    assert result.exit_code == 0, result.output[-3000:] + repr(result.exception)
    # 8 steps: select, verify-hf and verify-gguf (original side), eval-unedited, eval-hf and
    # eval-gguf (--kl-against the source) all read the source; it is loaded once
    assert loads.count(str(model)) == 1, loads
    assert loads.count(str(out / "model")) == 2  # the hf export: its verify and its eval, each freed after


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ('model = "m"\n[select]\nbogus = 1\n', "has no option 'bogus'"),
        ('model = "m"\n[bake]\noutput = "x"\n', "which the run manages"),
        ("[select]\nlimit = 1\n", "names no model"),
        ('model = "m"\nextra = 1\n', "unknown key"),
        ("model = ", "not valid TOML"),
    ],
)
def test_bad_recipes_are_one_clear_line(tmp_path, body, expect):
    path = tmp_path / "bad.toml"
    path.write_text(body, encoding="utf-8")
    result = _run(["run", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and isinstance(result.exception, CosmicBakeError)
    assert expect in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "out" / "direction").exists()


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipes_plan_valid_steps(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.goal in ("remove refusals", "make safer", "restore refusals") and recipe.description
    steps = plan_steps(recipe, tmp_path)  # builds (and so validates) every step's settings
    names = [s.name for s in steps]
    assert names[0] == "select" and "bake-hf" in names and any(n.startswith("verify-") for n in names)
    for step in steps:  # every step's command line parses with its real command and gives the same settings
        ctx = cli.commands[step.command].make_context(step.command, step.settings.argv(), resilient_parsing=False)
        assert type(step.settings).build(**ctx.params) == step.settings


def test_set_overrides_and_model_option(tmp_path):
    recipe = load_recipe(RECIPES / "smollm2-135m-remove-refusals.toml", ["select.limit=7", 'bake.formats=["hf"]'])
    assert recipe.steps["select"]["limit"] == 7 and recipe.formats == ["hf"]


def test_push_dry_run_lists_the_run_and_its_card(tiny_model_factory, tmp_path, monkeypatch):
    model = tiny_model_factory("llama", num_layers=4)
    out = tmp_path / "out"
    assert _run(["run", str(_recipe(tmp_path, model)), "-o", str(out)]).exit_code == 0
    result = _run(["push", str(out), "--repo-id", "someone/tiny-edited", "--dry-run"])
    assert result.exit_code == 0, result.output[-2000:] + repr(result.exception)
    listed = result.output
    for path in (
        "model.safetensors",
        "model-q8_0.gguf",
        "cosmic-bake/direction/direction.safetensors",
        "cosmic-bake/reports/verify-hf.json",
        "README.md  <- (card)",
    ):
        assert path in listed, path
    assert "## Verification and evaluation" in listed and "| hf | PASS |" in listed

    # without --dry-run and without a token: one clear line, nothing uploaded
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    no_token = _run(["push", str(out), "--repo-id", "someone/tiny-edited"])
    assert isinstance(no_token.exception, CosmicBakeError) and "no Hugging Face token" in str(no_token.exception)

    # with a token, the upload call receives every planned file in one commit (network stubbed)
    import huggingface_hub

    calls = {}
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.update(repo=(repo_id, kw))
    )

    def create_commit(self, repo_id, operations, **kw):
        calls["ops"] = {op.path_in_repo: op for op in operations}
        return huggingface_hub.CommitInfo(
            commit_url="https://huggingface.co/someone/tiny-edited/commit/1111111111111111111111111111111111111111",
            commit_message="m",
            commit_description="",
            oid="1" * 40,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    pushed = _run(["push", str(out), "--repo-id", "someone/tiny-edited", "--private", "--no-gguf"])
    assert pushed.exit_code == 0, pushed.output[-2000:] + repr(pushed.exception)
    assert calls["repo"] == ("someone/tiny-edited", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert "model.safetensors" in calls["ops"] and "model-q8_0.gguf" not in calls["ops"]
    assert b"Verification and evaluation" in calls["ops"]["README.md"].path_or_fileobj


def test_push_refuses_a_folder_without_weights(tmp_path):
    result = _run(["push", str(tmp_path), "--repo-id", "a/b", "--dry-run"])
    assert isinstance(result.exception, CosmicBakeError) and "config.json" in str(result.exception)
    bad_id = _run(["push", str(tmp_path), "--repo-id", "not a repo", "--dry-run"])
    assert "is not owner/name" in str(bad_id.exception)


def test_a_recipe_starts_from_another_recipes_output(tiny_model_factory, tmp_path, monkeypatch):
    """``model = "recipe:OTHER.toml"``: the other recipe runs first when its model folder is missing,
    then this one edits that folder, with every KL against ``eval.reference``."""
    model = tiny_model_factory("llama", num_layers=4)
    first = _recipe(tmp_path, model, formats='["hf"]')
    second = tmp_path / "restore.toml"
    second.write_text(
        first.read_text()
        .replace(f'model = "{model}"', f'model = "recipe:{first.name}"')
        .replace('gguf_outtypes = ["q8_0"]', "")
        .replace("[eval]", f'[eval]\nreference = "{model}"')
        .replace('formats = ["hf"]', 'formats = ["hf"]\n[select]\nmode = "affine"\nlimit = 12\nlimit_val = 4')
        .replace("[select]\nlimit = 12\nlimit_val = 4\nkl_threshold = 1e9\n", "", 1),
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # both run folders default to runs/NAME
    result = _run(["run", str(second)])
    assert result.exit_code == 0, result.output[-3000:] + repr(result.exception)
    made = tmp_path / "runs" / "tiny" / "model"
    assert (made / "manifest.json").is_file() and "running that recipe first" in result.output
    out = tmp_path / "runs" / "restore"
    summary = json.loads((out / "summary.json").read_text())
    assert {r["export"] for r in summary["rows"]} == {"reference", "unedited", "hf"}
    bake = json.loads((out / "model" / "manifest.json").read_text())
    assert bake["direction"]["mode"] == "affine"
    evals = {p.stem: json.loads(p.read_text()) for p in (out / "reports").glob("eval-*.json")}
    assert evals["eval-reference"]["harmless_kl"] == 0.0
    assert evals["eval-unedited"]["settings"]["kl_against"] == model.name  # the jailbroken model against the original
    # a second run reuses the other recipe's folder instead of running it again
    again = _run(["run", str(second)])
    assert again.exit_code == 0 and "running that recipe first" not in again.output
