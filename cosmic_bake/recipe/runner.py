"""``cosmic-bake run RECIPE.toml``: select -> bake -> export -> verify -> eval in one resumable go.

Each step is the same command a user would type (so a recipe can set any of its options), run
in-process with its outputs inside one run folder:

    OUT/direction/            select's run folder (direction, scores, plots)
    OUT/model/                the Hub-ready transformers folder (format hf)
    OUT/gguf/model-TYPE.gguf  one GGUF per output type (format gguf), with its manifest
    OUT/reports/              verify-*.json and eval-*.json
    OUT/card.md               the model card with the verify and eval figures added
    OUT/summary.md / .json    the final table; OUT/manifest.json lists everything with hashes

A step whose stamp (its arguments, the model's identity, the stamps of the steps it reads, the
tool version) matches the one recorded after its last success, and whose outputs still exist, is
reused instead of run again; a changed recipe reruns that step and everything after it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from cosmic_bake import __version__
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.outputs import read_json
from cosmic_bake.recipe.file import Recipe, command_args, model_identity, stamp

STAMPS = ".stamps"
INPUT_OPTIONS = ("harmful", "harmless", "harmful_val", "harmless_val", "prompts", "chat_template", "system_prompt")


@dataclass
class Step:
    """One command of the run: its name, argv, outputs and the steps whose outputs it reads."""

    name: str
    command: str
    args: list[str]
    outputs: list[Path]
    after: list[str] = field(default_factory=list)
    may_fail: bool = False  # verify exits 1 on a FAIL: record it, go on, fail the run at the end


@dataclass
class StepResult:
    name: str
    status: str  # "ran", "reused", "failed"
    seconds: float
    digest: str


def _gguf_name(outtype: str) -> str:
    return f"model-{outtype.lower()}.gguf"


def plan_steps(recipe: Recipe, out: Path, commands: dict[str, click.Command]) -> list[Step]:
    """The ordered steps of a recipe, each with the argv of its command."""
    m, common = recipe.model, recipe.common

    def args(step: str) -> list[str]:
        return command_args(step, commands[step], recipe.steps.get(step, {}), common)

    direction = out / "direction"
    steps = [
        Step("select", "select", [m, "-o", str(direction), *args("select")], [direction / "direction.safetensors"])
    ]
    exports: dict[str, Path] = {}
    bake_args = args("bake")
    if "hf" in recipe.formats:
        exports["hf"] = out / "model"
        steps.append(
            Step(
                "bake-hf",
                "bake",
                [m, "--direction", str(direction), "-o", str(exports["hf"]), *bake_args],
                [exports["hf"] / "manifest.json"],
                ["select"],
            )
        )
    if "gguf" in recipe.formats:
        for outtype in recipe.run_option("bake", "gguf_outtypes", ["source"]):
            path = out / "gguf" / _gguf_name(outtype)
            extra = [] if outtype == "source" else ["--outtype", outtype]
            steps.append(
                Step(
                    f"bake-gguf-{outtype}",
                    "bake",
                    [m, "--direction", str(direction), "--format", "gguf", "-o", str(path), *extra, *bake_args],
                    [path],
                    ["select"],
                )
            )
            exports[f"gguf-{outtype}"] = path
    reports = out / "reports"
    verify_targets = recipe.run_option("verify", "targets", list(exports))
    for name in verify_targets:
        if name not in exports:
            raise CosmicBakeError(
                f"recipe verify.targets names '{name}', which is not exported", f"use {list(exports)}"
            )
        report = reports / f"verify-{name}.json"
        steps.append(
            Step(
                f"verify-{name}",
                "verify",
                [m, str(exports[name]), "--direction", str(direction), "-o", str(report), *args("verify")],
                [report],
                ["select", _bake_step(name)],
                may_fail=True,
            )
        )
    eval_args = args("eval")
    if recipe.run_option("eval", "baseline", True):
        report = reports / "eval-unedited.json"
        steps.append(Step("eval-unedited", "eval", [m, "-o", str(report), "--force", *eval_args], [report]))
    for name in recipe.run_option("eval", "targets", list(exports)):
        if name not in exports:
            raise CosmicBakeError(f"recipe eval.targets names '{name}', which is not exported", f"use {list(exports)}")
        report = reports / f"eval-{name}.json"
        # KL against the source in the same runtime as the export (a transformers folder would
        # otherwise be compared with llama.cpp's logits of a GGUF source, adding its rounding)
        runtime = ["--runtime", "transformers"] if name == "hf" and "runtime" not in recipe.steps["eval"] else []
        steps.append(
            Step(
                f"eval-{name}",
                "eval",
                [str(exports[name]), "--kl-against", m, "-o", str(report), "--force", *runtime, *eval_args],
                [report],
                [_bake_step(name)],
            )
        )
    return steps


def run_inputs(recipe: Recipe, recipe_file: Path) -> list[Path]:
    """What the run reads, for the output rule: the recipe, the model and the files its steps name."""
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import file_inputs

    values = [v for opts in (recipe.common, *recipe.steps.values()) for k, v in opts.items() if k in INPUT_OPTIONS]
    return [Path(recipe_file), *model_inputs(recipe.model), *file_inputs(*values)]


def _bake_step(export: str) -> str:
    return "bake-hf" if export == "hf" else f"bake-{export}"


def _relative(args: list[str], out: Path) -> list[str]:
    """argv with the run folder written as ``$OUT`` so a moved run folder keeps its stamps."""
    return [a.replace(str(out), "$OUT") for a in args]


def execute(
    recipe: Recipe,
    steps: list[Step],
    out: Path,
    invoke: Callable[[list[str]], None],
    *,
    fresh: bool = False,
    echo: Callable[[str], None] = click.echo,
) -> list[StepResult]:
    """Run (or reuse) every step in order; a verify FAIL is recorded and the run goes on."""
    stamps_dir = out / STAMPS
    stamps_dir.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    results = []
    identity = model_identity(recipe.model)
    for i, step in enumerate(steps, 1):
        inputs = {
            "command": step.command,
            "args": _relative(step.args, out),
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
        echo(f"{label}: cosmic-bake {step.command} {' '.join(_relative(step.args, out))}")
        argv = [step.command, *step.args]
        if step.command in ("select", "bake", "verify") and any(p.exists() for p in step.outputs):
            argv.append("--force")  # its inputs changed: replace the stale output (only if the run wrote it)
        t = time.perf_counter()
        status = "ran"
        try:
            invoke(argv)
        except SystemExit as err:
            if err.code in (0, None):
                pass
            elif step.may_fail:
                status = "failed"
            else:
                raise CosmicBakeError(f"step {step.name} failed (exit {err.code})", "see its output above") from None
        seconds = time.perf_counter() - t
        stamp_file.write_text(json.dumps({"digest": digest, "status": status, "inputs": inputs, "seconds": seconds}))
        results.append(StepResult(step.name, status, seconds, digest))
    return results


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
        f"# cosmic-bake run: {recipe.model}" + (f" ({recipe.goal})" if recipe.goal else ""),
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
