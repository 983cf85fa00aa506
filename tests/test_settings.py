"""One settings object per command: the CLI, recipes and the API are built from it and agree.

``tests/data/cli_params.json`` is every command's click parameters as they were before the
options were generated from the settings classes (names, flags, defaults, types, choices); the
generated commands must match it, so moving the definitions changed no command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from cosmic_bake.cli import cli
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.recipe.file import load_recipe
from cosmic_bake.recipe.runner import plan_steps
from cosmic_bake.settings import COMMANDS, BakeSettings, EvalSettings, SelectSettings, SweepSettings
from cosmic_bake.settings.groups import EDITED_TYPES, OUTTYPES

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "cli_params.json").read_text())
# click destinations renamed so that dest, recipe key and API keyword are one name
RENAMED = {"out": "output", "run_dir": "direction", "out_format": "format", "prompts_file": "prompts"}
# a parsed option now shows its default as the text it parses (sweep's alphas: the same values)
PARSED_DEFAULTS = {("sweep", "alphas"): ("0,0.5,1,1.5,2", "0,0.5,1,1.5,2")}
# new options: bake --no-gguf-adapter (the API's LoRA ``gguf`` switch, which an error message already named);
# --record-paths and bake --base-model (issue 19: outputs fit to share)
ADDED = {name: {"record_paths"} for name in ("select", "compare", "sweep", "verify", "eval", "run", "bake")}
ADDED["bake"] |= {"gguf_adapter", "base_model"}
# select --all-scores (issue 16: KL computed only while it can change the choice, unless asked for all)
ADDED["select"] |= {"all_scores"}
# --sample-seed, and --limit / --limit-val take "all" too (issue 16: large prompt files sampled by default)
ADDED["select"] |= {"sample_seed"}
# the edit search and selecting under a run's hook (issues 17, 18)
ADDED["select"] |= {"search_trials", "search_kl", "search_candidates", "under", "under_one_layer"}
ADDED["compare"] |= {"sample_seed"}
# --device, --device-map, --max-memory, --offload-folder, and --dtype auto as the default (issue 15: GPUs and
# models beyond one device; auto is float32 on the CPU, so a CPU run is unchanged)
LOADING = ("select", "compare", "sweep", "verify", "eval")
for _name in LOADING:
    ADDED[_name] |= {"device", "device_map", "max_memory", "offload_folder"}
NEW_DEFAULTS = {(name, "dtype"): "auto" for name in LOADING}
NEW_CHOICES = {(name, "dtype"): ["auto", "float32", "bfloat16", "float16"] for name in LOADING}
# --direction-method projected (issue 17: heretic's projected abliteration)
NEW_CHOICES |= {(name, "direction_method"): ["mean", "pca", "projected"] for name in ("select", "compare")}
RETYPED = {(name, key) for name in ("select", "compare") for key in ("limit", "limit_val")}  # text: N or all
# --batch-size N|auto, auto by default (issue 15: the largest batch that fits on a GPU; on the CPU auto is the
# old default, 32, or 8 for verify)
RETYPED |= {(name, "batch_size") for name in LOADING}
NEW_DEFAULTS |= {(name, "batch_size"): "auto" for name in LOADING}


def _params(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params if p.name != "help"}


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_generated_options_match_the_hand_written_ones(name):
    params = {k: p for k, p in _params(cli.commands[name]).items() if k not in ADDED.get(name, ())}
    old = {RENAMED.get(row["name"], row["name"]): row for row in SNAPSHOT[name]}
    assert set(params) == set(old)
    for key, row in old.items():
        p = params[key]
        assert (p.opts, p.required, p.multiple) == (row["opts"], row["required"], row["multiple"]), key
        assert getattr(p, "secondary_opts", []) == row["secondary"], key
        assert getattr(p, "is_flag", False) == row["is_flag"], key
        if (name, key) in RETYPED:
            assert type(p.type).__name__ == "StringParamType", key
            continue
        assert type(p.type).__name__ == row["type"], key
        if "choices" in row:
            row = {**row, "choices": NEW_CHOICES.get((name, key), row["choices"])}
            assert list(p.type.choices) == row["choices"] and p.type.case_sensitive == row["case_sensitive"], key
        if "min" in row:
            assert (p.type.min, p.type.max) == (row["min"], row["max"]), key
        default = p.default if not isinstance(p.default, tuple) else list(p.default)
        old_default = None if row["default"] == "Sentinel.UNSET" else row["default"]  # click's "not given"
        old_default = NEW_DEFAULTS.get((name, key), old_default)
        expected = PARSED_DEFAULTS.get((name, key), (old_default,))[0]
        assert default == expected or (old_default is None and default in (None, False, ())), key


def _sample(cls):
    """Settings with every option away from its default where the type allows (all paths local)."""
    raw = {
        "select": {"model": "m", "output": "o", "mode": "affine", "alphas": "0.5,1", "limit": 3, "eval_layers": "2,3"},
        "bake": {
            "model": "m",
            "direction": "d",
            "output": "o.gguf",
            "format": "gguf",
            "outtype": "Q8_0",
            "base_model": "o/b",
        },
        "verify": {
            "original": "m",
            "baked": "b",
            "direction": "d",
            "output": "r.json",
            "force": True,
            "record_paths": True,
        },
        "eval": {"model": "m", "direction": "d", "intervention": "affine", "alpha": 0.25, "kl_against": "k"},
        "sweep": {"model": "m", "direction": "d", "output": "o", "alphas": [0, 2.5], "system_prompt": "Be kind."},
        "compare": {"output": "o", "eval_harmful": "h", "eval_harmless": "g", "eval_layers": 0.2, "force": True},
        "push": {"folder": "f", "repo_id": "me/x", "show_card": False, "dry_run": True},
        "run": {"recipe_file": "r.toml", "overrides": ["select.limit=3", "bake.formats=['hf']"], "fresh": True},
    }[cls.command]
    return cls.build(**raw)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_settings_survive_the_command_line(command):
    """``argv()`` parsed by the real command builds equal settings (what ``run`` prints is runnable)."""
    s = _sample(COMMANDS[command])
    ctx = cli.commands[command].make_context(command, s.argv(), resilient_parsing=False)
    assert COMMANDS[command].build(**ctx.params) == s
    assert json.loads(json.dumps(s.record())) == s.record()


def test_build_checks_every_source_the_same_way():
    assert SelectSettings.build(output="o", limit="7").limit == 7  # text from --set / a command line
    assert SelectSettings.build(output="o", limit="all", limit_val="ALL").limit_val == "all"
    assert SelectSettings.build(output="o", eval_layers=[19, 23]).eval_layers == (19, 23)  # a TOML list
    assert BakeSettings.build(model="m", direction="d", output="o", format="gguf", outtype="Q4_K_M").outtype == "q4_k_m"
    cases = [
        (lambda: SelectSettings.build(output="o", bogus=1), "select has no option 'bogus'"),
        (lambda: SelectSettings.build(output="o", limit="many"), "limit 'many' is neither a count"),
        (lambda: SelectSettings.build(output="o", limit=0), "limit '0' is neither a count of at least 1 nor 'all'"),
        (lambda: SelectSettings.build(output="o", limit_val=2.5), "limit '2.5'"),
        (lambda: SelectSettings.build(output="o", dtype="int8"), "use one of: auto, float32"),
        (lambda: SelectSettings.build(output="o", alphas="1,x"), "--alphas '1,x'"),
        (lambda: SelectSettings.build(output="o", alphas="1"), "--alphas applies to --mode affine"),
        (lambda: SelectSettings.build(), "select needs 'output'"),
        (lambda: BakeSettings.build(model="m", direction="d", output="o", outtype="q8_0"), "--outtype applies"),
        (lambda: EvalSettings.build(intervention="add"), "needs a direction"),
        (lambda: SweepSettings.build(model="m", direction="d", output="o", max_harmless_refusal=2), "between 0"),
    ]
    for make, expect in cases:
        with pytest.raises(CosmicBakeError) as err:
            make()
        assert expect in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_gguf_type_names_match_the_quantizer():
    """The settings keep their own copy of the type names (so loading settings never imports gguf)."""
    from cosmic_bake.export.ggml_quant import EDITED_TYPES as edited
    from cosmic_bake.export.ggml_quant import FILE_TYPES

    assert tuple(OUTTYPES) == tuple(FILE_TYPES) and EDITED_TYPES == edited


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ("[select]\nbatch_size = 'many'\n", "recipe [select]: --batch-size 'many' is not a number"),
        ("[select]\nbatch_size = 0\n", "recipe [select]: --batch-size 0 is not positive"),
        ("[select]\nlimit = 'many'\n", "recipe [select]: limit 'many' is neither a count of at least 1 nor 'all'"),
        ("[bake]\nformat = 'gguf'\n", "recipe [bake] sets 'format', which the run manages"),
        ("[eval]\nmodel = 'x'\n", "recipe [eval] sets 'model', which the run manages"),
        ("[common]\nlimt = 3\n", "recipe [common] has no option 'limt'"),
        ("[verify]\ndtype = 'int8'\n", "recipe [verify]: verify option 'dtype' is 'int8'"),
    ],
)
def test_recipe_values_are_checked_by_the_settings(tmp_path, body, expect):
    path = tmp_path / "r.toml"
    path.write_text(f'model = "m"\n{body}', encoding="utf-8")
    with pytest.raises(CosmicBakeError) as err:
        plan_steps(load_recipe(path), tmp_path / "out")
    assert expect in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_common_keys_reach_the_steps_that_have_them(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('model = "m"\n[common]\ndtype = "bfloat16"\nlimit = 5\n[bake]\nformats = ["hf"]\n')
    steps = {s.name: s.settings for s in plan_steps(load_recipe(path), tmp_path / "out")}
    assert steps["select"].dtype == steps["verify-hf"].dtype == steps["eval-hf"].dtype == "bfloat16"
    assert steps["select"].limit == 5 and steps["verify-hf"].limit == 5
    assert steps["eval-hf"].runtime == "transformers" and steps["eval-unedited"].runtime == "auto"
