"""``cosmic-bake run`` on a recipe, this checkout against an earlier commit, in one run.

The earlier commit is checked out with ``git worktree`` (default: 6f9fd55, the last commit whose
runner drove click in-process and loaded the model in every step). Both runs get the same recipe,
``--fresh``, a new run folder and the same environment, one after the other (never at once: on
2 cores two runs slow each other several-fold). Prints, per step, the seconds of each and how many
times each run loaded a transformers model (``load_model`` calls, counted by a wrapper), then the
total time and the ratio.

    python benchmarks/bench_run.py [--recipe recipes/smollm2-135m-remove-refusals.toml] [--base 6f9fd55]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI with transformers model loads counted: every load_model call prints one line
# (verify's loads were silent before; llama.cpp loads are not transformers loads and not counted).
DRIVER = """
import sys
import cosmic_bake.model.loading as loading
original = loading.load_model
def counted(spec, *args, **kwargs):
    print(f"LOAD_MODEL {spec}", file=sys.stderr, flush=True)
    return original(spec, *args, **kwargs)
loading.load_model = counted
from cosmic_bake.cli import main
sys.argv = ["cosmic-bake", *sys.argv[1:]]
main()
"""


def run(checkout: Path, recipe: Path, out: Path) -> dict:
    """One ``run --fresh`` from ``checkout``'s code; its step seconds, load lines and wall time."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, "run", str(recipe), "-o", str(out), "--fresh"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise SystemExit(f"run from {checkout} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    loads = [line.removeprefix("LOAD_MODEL ") for line in proc.stderr.splitlines() if line.startswith("LOAD_MODEL")]
    steps = json.loads((out / "summary.json").read_text())["steps"]
    return {"wall": wall, "loads": loads, "steps": {s["name"]: s["seconds"] for s in steps}, "exit": proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-135m-remove-refusals.toml")
    parser.add_argument("--base", default="6f9fd55")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    recipe = args.recipe.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True)
        try:
            before = run(base, recipe, Path(tmp) / "before")
            after = run(ROOT, recipe, Path(tmp) / "after")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    print(f"recipe {recipe.name}: {args.base} (before) and this checkout (after), one after the other")
    print(f"{'step':<22}{'before s':>10}{'after s':>10}")
    for name in before["steps"]:
        print(f"{name:<22}{before['steps'][name]:>10.1f}{after['steps'].get(name, float('nan')):>10.1f}")
    ratio = after["wall"] / before["wall"]
    print(f"{'wall':<22}{before['wall']:>10.1f}{after['wall']:>10.1f}   ratio after/before {ratio:.3f}")
    print(f"transformers model loads: before {len(before['loads'])}, after {len(after['loads'])}")
    for label, r in (("before", before), ("after", after)):
        for line in r["loads"]:
            print(f"  {label}: {line}")
    if args.out:
        args.out.write_text(json.dumps({"base": args.base, "before": before, "after": after}, indent=1))


if __name__ == "__main__":
    main()
