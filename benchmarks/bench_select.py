"""``cosmic-bake select``, this checkout against an earlier commit, on the same inputs, in one run.

The earlier commit (default: c3bb08d, the commit before issue 16's speed-ups) is checked out with
``git worktree``. Two cases, each run by both checkouts one after the other (never at once: on
2 cores two runs slow each other several-fold), nothing else should be running:

* ``reference``: the reference case (``../shared/reference``, Qwen2.5-Coder-0.5B, its prompts and
  chat template, batch size 32), as ``benchmarks/reference_cosmic.py`` runs it;
* ``recipe``: the select step of the default recipe (``recipes/smollm2-135m-remove-refusals.toml``:
  its ``[common]`` and ``[select]`` keys as command-line options).

Prints, per case, the seconds after loading (``timings.total`` of selection.json) and the wall
time of each checkout, the ratio before/after (the speed-up), and whether both chose the same
candidate with the same evaluation layers (and the largest difference between scores both
computed). ``--smoke`` runs both cases on a tiny random model with a few built-in prompts instead,
to check that the script works (its times mean nothing).

    python benchmarks/bench_select.py [--base c3bb08d] [--cases reference,recipe] [--out bench.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from reference_cosmic import REFERENCE, TEMPLATE  # noqa: E402

RECIPE = ROOT / "recipes" / "smollm2-135m-remove-refusals.toml"
BASE = "c3bb08d"
SCORES = ("s_comply", "s_refuse", "kl", "refusal_score", "steering_score")


def reference_args(model: str = "builtin:qwen2.5-coder-0.5b-instruct") -> list[str]:
    """The reference case's select options (as ``reference_cosmic.py`` passes them)."""
    files = {
        "--harmful": str(REFERENCE / "harmful_train.json"),
        "--harmless": str(REFERENCE / "harmless_train.json"),
        "--harmful-val": str(REFERENCE / "harmful_val.json"),
        "--harmless-val": str(REFERENCE / "harmless_val.json"),
    }
    return [model, *(x for kv in files.items() for x in kv), "--chat-template", TEMPLATE, "--batch-size", "32"]


def recipe_args(recipe: Path = RECIPE, model: str | None = None) -> list[str]:
    """The recipe's select step as options: its model, ``[common]`` and ``[select]`` keys."""
    data = tomllib.loads(recipe.read_text())
    args = [model or data["model"]]
    for key, value in {**data.get("common", {}), **data.get("select", {})}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        elif isinstance(value, list):
            args += [flag, ",".join(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


def select(checkout: Path, args: list[str], out: Path, quiet: bool) -> dict:
    """One ``select`` with ``checkout``'s code; selection.json, wall seconds and the code's path."""
    env = {**os.environ, "PYTHONPATH": str(checkout), **({"COSMIC_BAKE_QUIET": "1"} if quiet else {})}
    code = "import sys, cosmic_bake; print(cosmic_bake.__file__, file=sys.stderr); from cosmic_bake.cli import main; "
    code += "sys.argv = ['cosmic-bake', *sys.argv[1:]]; main()"
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, "select", *args, "-o", str(out)],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=None if not quiet else subprocess.PIPE,
        text=True,
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"select from {checkout} failed ({proc.returncode}):\n{(proc.stderr or '')[-3000:]}")
    sel = json.loads((out / "selection.json").read_text())
    return {"wall": wall, "after_load": sel["timings"]["total"], "timings": sel["timings"], "selection": sel}


def agreement(a: dict, b: dict) -> dict:
    """Same choice and evaluation layers; the largest difference of the scores both computed."""
    rows_b = {(r["position"], r["layer"]): r for r in b["candidates"]}
    worst, compared = 0.0, 0
    for r in a["candidates"]:
        other = rows_b[(r["position"], r["layer"])]
        for name in SCORES:
            if r.get(name) is not None and other.get(name) is not None:
                worst, compared = max(worst, abs(r[name] - other[name])), compared + 1
    return {
        "same_choice": a["chosen"] == b["chosen"],
        "same_eval_layers": a["eval_layers"] == b["eval_layers"],
        "chosen": [a["chosen"], b["chosen"]],
        "max_abs_score_diff": worst,
        "scores_compared": compared,
    }


def tiny_model(folder: Path) -> str:
    """A tiny random Qwen2 model (tests/tiny_models.py) for ``--smoke``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny_model

    return str(make_tiny_model("qwen2", folder, num_layers=8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=BASE, help="the earlier commit (default: %(default)s)")
    ap.add_argument("--cases", default="reference,recipe")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, few prompts: check the script only")
    ap.add_argument("--quiet", action="store_true", help="hide the runs' progress bars")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-select-") as tmp_name:
        tmp = Path(tmp_name)
        if args.smoke:
            model = tiny_model(tmp / "tiny")
            small = ["--limit", "16", "--limit-val", "4"]
            inputs = {
                "reference": [*reference_args(model)[:9], "--batch-size", "8", *small],
                "recipe": [*recipe_args(model=model), *small],
            }
        else:
            inputs = {"reference": reference_args(), "recipe": recipe_args()}
        base = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True)
        try:
            for case in cases:
                runs = {}
                for label, checkout in (("before", base), ("after", ROOT)):
                    print(f"== {case}: {label} ({args.base if label == 'before' else 'this checkout'})", flush=True)
                    runs[label] = select(checkout, inputs[case], tmp / f"{case}-{label}", args.quiet)
                results[case] = {
                    "before_s": runs["before"]["after_load"],
                    "after_s": runs["after"]["after_load"],
                    "speedup": runs["before"]["after_load"] / runs["after"]["after_load"],
                    "wall_before_s": runs["before"]["wall"],
                    "wall_after_s": runs["after"]["wall"],
                    "timings": {k: v["timings"] for k, v in runs.items()},
                    "kl_computed": runs["after"]["selection"].get("kl_computed"),
                    **agreement(runs["before"]["selection"], runs["after"]["selection"]),
                }
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    smoke = " [smoke: times mean nothing]" if args.smoke else ""
    print(f"\nselect: {args.base} (before) vs this checkout (after), one after the other{smoke}")
    head = f"{'case':<11}{'before s':>10}{'after s':>10}{'speed-up':>10}{'wall before':>13}{'wall after':>12}"
    print(f"{head}  same choice")
    for case, r in results.items():
        same = "yes" if r["same_choice"] and r["same_eval_layers"] else "NO"
        print(
            f"{case:<11}{r['before_s']:>10.1f}{r['after_s']:>10.1f}{r['speedup']:>9.2f}x"
            f"{r['wall_before_s']:>13.1f}{r['wall_after_s']:>12.1f}  {same} {r['chosen'][1]}"
            f" (max |score diff| {r['max_abs_score_diff']:.2g} over {r['scores_compared']})"
        )
    if args.out:
        args.out.write_text(json.dumps({"base": args.base, "smoke": args.smoke, "cases": results}, indent=1) + "\n")
    if not all(r["same_choice"] and r["same_eval_layers"] for r in results.values()):
        raise SystemExit("the choices differ")


if __name__ == "__main__":
    main()
