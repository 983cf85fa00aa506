"""``cosmic-bake run RECIPE.toml``: select -> bake -> export -> verify -> eval in one resumable go.

Each step is the API call of the command a user would type (so a recipe can set any of its
options, checked by the command's settings class), run in-process with one :class:`Session`, so
the recipe's model is loaded once for select, verify and the evaluations; its outputs sit inside
one run folder:

    OUT/direction/            select's run folder (direction, scores, plots)
    OUT/model/                the Hub-ready transformers folder (format hf)
    OUT/gguf/model-TYPE.gguf  one GGUF per output type (format gguf), with its manifest
    OUT/reports/              verify-*.json and eval-*.json
    OUT/card.md               the model card with the verify and eval figures added
    OUT/summary.md / .json    the final table; OUT/manifest.json lists everything with hashes

A step whose stamp (its settings, the model's identity, the stamps of the steps it reads, the
tool version) matches the one recorded after its last success, and whose outputs still exist, is
reused instead of run again; a changed recipe reruns that step and everything after it.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from cosmic_bake import __version__
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.session import Session
from cosmic_bake.outputs import read_json
from cosmic_bake.recipe.file import Recipe, check_common, load_recipe, model_identity, stamp, step_settings
from cosmic_bake.settings import RunSettings, Settings
from cosmic_bake.sharing import portable_name

STAMPS = ".stamps"


@dataclass
class Step:
    """One command of the run: its settings, outputs and the steps whose outputs it reads."""

    name: str
    command: str
    settings: Settings
    outputs: list[Path]
    after: list[str] = field(default_factory=list)
    may_fail: bool = False  # a verify FAIL: record it, go on, fail the run at the end


@dataclass
class StepResult:
    name: str
    status: str  # "ran", "reused", "failed"
    seconds: float
    digest: str


def _gguf_name(outtype: str) -> str:
    return f"model-{outtype.lower()}.gguf"


def plan_steps(recipe: Recipe, out: Path, record_paths: bool = False) -> list[Step]:
    """The ordered steps of a recipe, each with its settings built (and so validated) before anything runs.

    ``record_paths`` (``run --record-paths``) lets every step's manifest and report name local paths.
    """
    from cosmic_bake.settings import BakeSettings, EvalSettings, SelectSettings, VerifySettings

    check_common(recipe, [SelectSettings, BakeSettings, VerifySettings, EvalSettings])
    paths = {"record_paths": True} if record_paths else {}

    def settings_of(step: str, cls, managed: dict, defaults: dict | None = None) -> Settings:
        return step_settings(recipe, step, cls, managed, {**(defaults or {}), **paths})

    m, direction = recipe.model, out / "direction"
    select = settings_of("select", SelectSettings, {"model": m, "output": direction})
    steps = [Step("select", "select", select, [direction / "direction.safetensors"])]
    exports: dict[str, Path] = {}
    bake = {"model": m, "direction": direction}
    if "hf" in recipe.formats:
        exports["hf"] = out / "model"
        settings = settings_of("bake", BakeSettings, {**bake, "format": "hf", "output": exports["hf"]})
        steps.append(Step("bake-hf", "bake", settings, [exports["hf"] / "manifest.json"], ["select"]))
    if "gguf" in recipe.formats:
        for outtype in recipe.run_option("bake", "gguf_outtypes", ["source"]):
            path = out / "gguf" / _gguf_name(outtype)
            managed = {**bake, "format": "gguf", "output": path, "outtype": None if outtype == "source" else outtype}
            settings = settings_of("bake", BakeSettings, managed)
            steps.append(Step(f"bake-gguf-{outtype}", "bake", settings, [path], ["select"]))
            exports[f"gguf-{outtype}"] = path
    reports = out / "reports"
    for name in recipe.run_option("verify", "targets", list(exports)):
        if name not in exports:
            raise CosmicBakeError(
                f"recipe verify.targets names '{name}', which is not exported", f"use {list(exports)}"
            )
        report = reports / f"verify-{name}.json"
        managed = {"original": m, "baked": str(exports[name]), "direction": direction, "output": report}
        settings = settings_of("verify", VerifySettings, managed)
        steps.append(Step(f"verify-{name}", "verify", settings, [report], ["select", _bake_step(name)], may_fail=True))
    reference = recipe.run_option("eval", "reference", None)
    against = {"kl_against": reference} if reference else {}
    if reference:
        report = reports / "eval-reference.json"
        settings = settings_of("eval", EvalSettings, {"model": reference, "output": report, "force": True})
        steps.append(Step("eval-reference", "eval", settings, [report]))
    if recipe.run_option("eval", "baseline", True):
        report = reports / "eval-unedited.json"
        settings = settings_of("eval", EvalSettings, {"model": m, "output": report, "force": True, **against})
        steps.append(Step("eval-unedited", "eval", settings, [report]))
    for name in recipe.run_option("eval", "targets", list(exports)):
        if name not in exports:
            raise CosmicBakeError(f"recipe eval.targets names '{name}', which is not exported", f"use {list(exports)}")
        report = reports / f"eval-{name}.json"
        # KL against the source in the same runtime as the export (a transformers folder would
        # otherwise be compared with llama.cpp's logits of a GGUF source, adding its rounding)
        defaults = {"runtime": "transformers"} if name == "hf" else {}
        managed = {"model": str(exports[name]), "kl_against": reference or m, "output": report, "force": True}
        settings = settings_of("eval", EvalSettings, managed, defaults)
        steps.append(Step(f"eval-{name}", "eval", settings, [report], [_bake_step(name)]))
    return steps


def run_inputs(recipe_file: Path, steps: list[Step]) -> list[Path]:
    """What the run reads, for the output rule: the recipe, the model and the files its steps name.

    What one step writes and a later one reads (the direction, the exports) is the run's own.
    """
    produced = [_real(s.settings.output) for s in steps if s.command in ("select", "bake")]
    named = [Path(p) for step in steps for p in step.settings.inputs()]
    own = [p for p in named if any(r == _real(p) or r in _real(p).parents for r in produced)]
    return [Path(recipe_file), *(p for p in named if p not in own)]


def _real(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _bake_step(export: str) -> str:
    return "bake-hf" if export == "hf" else f"bake-{export}"


def _relative(value: Any, out: Path) -> Any:
    """``value`` with the run folder written as ``$OUT``, so a moved run folder keeps its stamps."""
    if isinstance(value, str):
        return value.replace(str(out), "$OUT")
    if isinstance(value, list):
        return [_relative(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _relative(v, out) for k, v in value.items()}
    return value


def execute(
    recipe: Recipe,
    steps: list[Step],
    out: Path,
    *,
    session: Session | None = None,
    fresh: bool = False,
    echo: Callable[[str], None] = click.echo,
    show: dict[str, Callable[[Any, Any], None]] | None = None,
) -> list[StepResult]:
    """Run (or reuse) every step in order through the API; a verify FAIL is recorded and the run goes on.

    ``session`` keeps the recipe's model loaded across steps; ``show`` maps a command to the
    function that prints its result (the CLI's), so a run prints what the commands print.
    """
    from cosmic_bake import api

    calls = {"select": api.select, "bake": api.bake, "verify": api.verify, "eval": api.evaluate}
    session = session or Session(pin={recipe.model})
    stamps_dir = out / STAMPS
    stamps_dir.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    results = []
    identity = model_identity(recipe.model)
    for i, step in enumerate(steps, 1):
        inputs = {
            "command": step.command,
            "settings": _relative(step.settings.record(), out),
            "model": identity,
            "after": {s: digests.get(s) for s in step.after},
            "version": __version__,
        }
        digest = stamp(inputs)
        digests[step.name] = digest
        stamp_file = stamps_dir / f"{step.name}.json"
        old = {}
        if not fresh and stamp_file.is_file():  # --fresh ignores stamps, so a broken one cannot block it
            old = read_json(stamp_file, f"delete it (step {step.name} then runs again), or pass --fresh")
        reusable = not fresh and old.get("digest") == digest and all(p.exists() for p in step.outputs)
        label = f"[{i}/{len(steps)}] {step.name}"
        if reusable and old.get("status") in ("ran", "reused"):
            echo(f"{label}: reused (inputs unchanged)")
            results.append(StepResult(step.name, "reused", 0.0, digest))
            continue
        settings = step.settings
        if step.command in ("select", "bake", "verify") and any(p.exists() for p in step.outputs):
            settings = settings.replace(force=True)  # its inputs changed: replace the stale output (the run's own)
        echo(f"{label}: cosmic-bake {step.command} {_relative(shlex.join(settings.argv()), out)}")
        t = time.perf_counter()
        result = calls[step.command](settings, session=session)
        status = "failed" if step.may_fail and not getattr(result, "passed", True) else "ran"
        if show and step.command in show:
            show[step.command](settings, result)
        seconds = time.perf_counter() - t
        stamp_file.write_text(json.dumps({"digest": digest, "status": status, "inputs": inputs, "seconds": seconds}))
        results.append(StepResult(step.name, status, seconds, digest))
    return results


def run_recipe(
    s: RunSettings,
    *,
    echo: Callable[[str], None] = click.echo,
    show: dict[str, Callable[[Any, Any], None]] | None = None,
    session: Session | None = None,
) -> int:
    """``cosmic-bake run``: plan, run or reuse every step, then write the summary, card and manifest.

    Returns the exit status: 1 when a verify step failed, else 0.
    """
    from cosmic_bake.export.card import CARD_FILE, card_with_results
    from cosmic_bake.outputs import TOOL, check_target, manifest, write_json, write_text

    recipe = load_recipe(s.recipe_file, [*s.overrides, *([f'model="{s.model}"'] if s.model else [])])
    recipe.model = chained_model(recipe, s, echo=echo, show=show, session=session)
    out = run_folder(recipe, s.output)
    steps = plan_steps(recipe, out, s.record_paths)
    # the run folder is resumed in place, never replaced; each step's own output is checked by its call
    check_target(out, force=True, inputs=run_inputs(s.recipe_file, steps), kind="run")
    echo(f"run {s.recipe_file} -> {out} ({len(steps)} steps, model {recipe.model})")
    session = session or Session(pin={recipe.model})
    session.pinned.add(recipe.model)
    with session:
        results = execute(recipe, steps, out, session=session, fresh=s.fresh, echo=echo, show=show)
    summary = summarize(out, results)
    text = summary_markdown(recipe, summary)
    write_text(out / "summary.md", text)
    write_json(out / "summary.json", {"tool": TOOL, **summary})
    card = out / "model" / CARD_FILE
    if card.is_file():
        write_text(out / "card.md", card_with_results(card.read_text(encoding="utf-8"), summary["rows"]))
    manifest(
        out,
        record_paths=s.record_paths,
        stage="run",
        source={"spec": recipe.model},
        extra={
            "recipe": recipe.source,
            "overrides": list(s.overrides),
            "settings": s.record(),
            "steps": [r.__dict__ for r in results],
        },
    )
    echo("\n" + text)
    return exit_code(results)


CHAIN = "recipe:"


def run_folder(recipe: Recipe, output: Path | None) -> Path:
    """``-o``, else the recipe's ``output``, else ``runs/RECIPE_NAME`` (resolved)."""
    return (output or Path(recipe.output or Path("runs") / Path(recipe.source).stem)).resolve()


def chained_model(recipe: Recipe, s: RunSettings, **kw) -> str:
    """The model a recipe names; ``recipe:OTHER.toml`` is that recipe's ``model/`` folder, made first if missing."""
    if not recipe.model.startswith(CHAIN):
        return recipe.model
    path = Path(recipe.source).parent / recipe.model[len(CHAIN) :]
    other = load_recipe(path)
    if "hf" not in other.formats:
        raise CosmicBakeError(
            f"{recipe.model} exports no transformers folder to start from", f'add "hf" to bake.formats in {path.name}'
        )
    folder = run_folder(other, None) / "model"
    if not (folder / "manifest.json").is_file():
        kw.get("echo", click.echo)(f"{recipe.model}: {folder} is missing; running that recipe first")
        if run_recipe(RunSettings.build(recipe_file=path, record_paths=s.record_paths), **kw):
            raise CosmicBakeError(f"the recipe {path.name} that makes the model failed", f"run it alone: {path}")
    return str(folder)


def summarize(out: Path, results: list[StepResult]) -> dict:
    """Collect verify and eval reports into one table (JSON-able) keyed by export."""
    reports = out / "reports"
    rows: dict[str, dict] = {}
    for path in sorted(reports.glob("*.json")) if reports.is_dir() else []:
        kind, _, name = path.stem.partition("-")
        data = json.loads(path.read_text(encoding="utf-8"))
        row = rows.setdefault(name, {"export": name})
        if kind == "verify":
            row["verify"] = {
                k: data.get(k) for k in ("passed", "mean_kl", "max_kl", "top1_agreement", "runtime", "weight_type")
            }
        elif kind == "eval":
            row["eval"] = {
                k: data.get(k)
                for k in ("harmful_refusal_rate", "harmless_refusal_rate", "harmless_kl", "n_harmful", "n_harmless")
            }
    for name, row in rows.items():
        target = out / "model" if name == "hf" else out / "gguf" / _gguf_name(name.removeprefix("gguf-"))
        if target.exists():
            files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
            row["size_mib"] = sum(p.stat().st_size for p in files) / 2**20
    return {"rows": list(rows.values()), "steps": [r.__dict__ for r in results]}


def summary_markdown(recipe: Recipe, summary: dict) -> str:
    """The final table as Markdown (also printed)."""
    lines = [
        f"# cosmic-bake run: {portable_name(recipe.model)}" + (f" ({recipe.goal})" if recipe.goal else ""),
        "",
        "| output | size MiB | verify | mean KL | top-1 | harmful refusal | harmless refusal | harmless KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        v, e = row.get("verify") or {}, row.get("eval") or {}
        cells = [
            row["export"],
            f"{row['size_mib']:.1f}" if "size_mib" in row else "—",
            ("PASS" if v.get("passed") else "FAIL") if v else "—",
            f"{v['mean_kl']:.2e}" if v.get("mean_kl") is not None else "—",
            f"{v['top1_agreement']:.3f}" if v.get("top1_agreement") is not None else "—",
            _rate(e, "harmful"),
            _rate(e, "harmless"),
            f"{e['harmless_kl']:.4f}" if e.get("harmless_kl") is not None else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} |" for s in summary["steps"]]
    return "\n".join(lines) + "\n"


def _rate(e: dict, which: str) -> str:
    rate, n = e.get(f"{which}_refusal_rate"), e.get(f"n_{which}")
    return "—" if rate is None else f"{rate:.3f} ({round(rate * n)}/{n})"


def exit_code(results: list[StepResult]) -> int:
    return 1 if any(r.status == "failed" for r in results) else 0
