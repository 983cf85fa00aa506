"""Recipes: one TOML file that says how to select, bake, export, verify and evaluate a model.

A recipe names the model and, per step, the options of that step's command, spelled as on the
command line without the dashes (``limit_val = 16`` is ``--limit-val 16``): the fields of the
command's settings class (:mod:`cosmic_bake.settings`). So every option a command has can be set
in a recipe, values are checked as the command line checks them, and nothing has two names.
``cosmic-bake run`` merges three layers, later ones winning: the command's defaults, the recipe,
and ``--set step.key=value``
overrides on its command line (heretic's layered config, in TOML).

    model = "builtin:smollm2-135m-instruct"
    goal = "remove refusals"

    [common]              # passed to every step whose command has the option
    dtype = "float32"

    [select]
    limit = 64

    [bake]
    formats = ["hf", "gguf"]   # run's own keys: which exports to make
    gguf_outtypes = ["q8_0"]   # one GGUF per type ("source": keep a GGUF source's types)

    [verify]
    limit = 8

    [eval]
    baseline = true            # also evaluate the unedited model
    limit_harmless = 32
    reference = "builtin:..."  # also evaluate this model, and measure every KL against it

``model = "recipe:OTHER.toml"`` (a path relative to this recipe) takes the transformers folder
another recipe writes (its run folder's ``model/``), running that recipe first when the folder is
missing: a restoring recipe starts from the jailbroken model a removal recipe makes.

Keys the run itself manages (outputs, the direction, ``--force``) are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.settings.base import Settings

STEPS = ("select", "bake", "verify", "eval")
RUN_KEYS = {  # keys a step section may hold that are the run's, not the command's
    "bake": {"formats", "gguf_outtypes"},
    "eval": {"baseline", "targets", "reference"},
    "verify": {"targets"},
}
MANAGED = {"output", "direction", "force", "kl_against", "model", "original", "baked"}
TOP_KEYS = {"model", "goal", "description", "output", "common", *STEPS}
FORMATS = ("hf", "gguf")


@dataclass
class Recipe:
    """A parsed, merged recipe: the model and the options of each step (by option name)."""

    model: str
    goal: str
    description: str
    output: str | None
    steps: dict[str, dict[str, Any]]
    common: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def run_option(self, step: str, key: str, default: Any) -> Any:
        return self.steps.get(step, {}).get(key, default)

    @property
    def formats(self) -> list[str]:
        formats = list(self.run_option("bake", "formats", ["hf"]))
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise CosmicBakeError(f"recipe bake.formats {formats} is not a list of hf / gguf", 'e.g. ["hf", "gguf"]')
        return formats


def _key(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``select.limit=32`` -> (["select", "limit"], 32); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise CosmicBakeError(f"--set '{text}' is not KEY=VALUE", "e.g. --set select.limit=32")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return [_key(k) for k in key.split(".")], value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply ``--set`` overrides, and check every key against the steps."""
    path = Path(path)
    if not path.is_file():
        raise CosmicBakeError(f"recipe {path} not found", "pass a .toml file (see recipes/)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CosmicBakeError(f"recipe {path} is not valid TOML ({err})", "fix the file") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CosmicBakeError(f"--set '{text}': '{k}' is not a section", "set a key inside a section")
        node[keys[-1]] = value
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise CosmicBakeError(
            f"recipe {path.name}: unknown key(s) {', '.join(unknown)}",
            f"top-level keys are {', '.join(sorted(TOP_KEYS))}",
        )
    if "model" not in data:
        raise CosmicBakeError(
            f"recipe {path.name} names no model", 'add model = "HUB_ID | FOLDER | FILE.gguf | builtin:NAME"'
        )
    steps = {s: {_key(k): v for k, v in (data.get(s) or {}).items()} for s in STEPS}
    return Recipe(
        model=str(data["model"]),
        goal=str(data.get("goal", "")),
        description=str(data.get("description", "")),
        output=data.get("output"),
        steps=steps,
        common={_key(k): v for k, v in (data.get("common") or {}).items()},
        source=str(path),
    )


def step_settings(
    recipe: Recipe, step: str, cls: type[Settings], managed: dict[str, Any], defaults: dict[str, Any] | None = None
) -> Settings:
    """The settings of one step: ``[common]`` keys ``cls`` has, then ``defaults``, then ``[step]``, then ``managed``.

    ``managed`` are the values the run sets itself (paths inside the run folder, ``force``); a
    recipe that sets one of them, or an option the command does not have, gets a one-line error
    naming the section.
    """
    names = {f.name for f in fields(cls)}
    merged = {k: v for k, v in recipe.common.items() if k in names and k not in managed}
    merged.update(defaults or {})
    for k, v in recipe.steps.get(step, {}).items():
        if k in RUN_KEYS.get(step, set()):
            continue
        if k in MANAGED or k in managed:
            raise CosmicBakeError(f"recipe [{step}] sets '{k}', which the run manages", f"remove '{k}' from [{step}]")
        if k not in names:
            known = ", ".join(sorted(names - MANAGED - set(managed)))
            raise CosmicBakeError(f"recipe [{step}] has no option '{k}'", f"options of {cls.command}: {known}")
        merged[k] = v
    try:
        return cls.build(**merged, **managed)
    except CosmicBakeError as err:
        raise CosmicBakeError(f"recipe [{step}]: {err.problem}", err.fix) from None


def check_common(recipe: Recipe, classes: list[type[Settings]]) -> None:
    """A ``[common]`` key must be an option of at least one step (a typo would otherwise do nothing)."""
    names = {f.name for cls in classes for f in fields(cls)} - MANAGED
    for k in recipe.common:
        if k not in names:
            raise CosmicBakeError(
                f"recipe [common] has no option '{k}'", f"options of the steps: {', '.join(sorted(names))}"
            )


def stamp(inputs: dict) -> str:
    """The digest that decides whether a finished step can be reused: its inputs, canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(spec: str) -> dict:
    """What names a model's content cheaply: size and mtime of local files (Hub ids and builtins by name)."""
    path = Path(spec).expanduser()
    if path.is_file():
        st = path.stat()
        return {"spec": spec, "size": st.st_size, "mtime": st.st_mtime_ns}
    if path.is_dir():
        return {
            "spec": spec,
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()},
        }
    return {"spec": spec}
