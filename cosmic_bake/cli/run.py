"""``run`` command: one recipe from model to verified, evaluated exports (see :mod:`cosmic_bake.recipe.runner`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("run")
@click.argument("recipe_file", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    default=None,
    type=click.Path(path_type=Path),
    help="Run folder (default: the recipe's output, else runs/RECIPE_NAME).",
)
@click.option("--model", default=None, help="Use this model instead of the recipe's.")
@click.option(
    "--set", "overrides", multiple=True, help="Override a recipe key, e.g. --set select.limit=32 (repeatable)."
)
@click.option("--fresh", is_flag=True, help="Run every step again even when its inputs are unchanged.")
def run_cmd(recipe_file, out, model, overrides, fresh) -> None:
    """Select, bake, export, verify and evaluate as RECIPE_FILE says; resumable."""
    from cosmic_bake.export.card import CARD_FILE, card_with_results
    from cosmic_bake.outputs import TOOL, check_target, manifest, write_json, write_text
    from cosmic_bake.recipe.file import load_recipe
    from cosmic_bake.recipe.runner import (
        execute,
        exit_code,
        plan_steps,
        run_inputs,
        summarize,
        summary_markdown,
    )

    recipe = load_recipe(recipe_file, [*overrides, *([f'model="{model}"'] if model else [])])
    out = (out or Path(recipe.output or Path("runs") / Path(recipe_file).stem)).resolve()
    root = click.get_current_context().find_root().command  # the cosmic-bake group (no import of it here)
    commands = {name: root.commands[name] for name in ("select", "bake", "verify", "eval")}
    steps = plan_steps(recipe, out, commands)
    # the run folder is resumed in place, never replaced; each step's own -o is checked by its command
    check_target(out, force=True, inputs=run_inputs(recipe, recipe_file), kind="run")
    click.echo(f"run {recipe_file} -> {out} ({len(steps)} steps, model {recipe.model})")

    def invoke(argv: list[str]) -> None:
        """Run one cosmic-bake command in this process (models load once per step, errors stay one line)."""
        root.main(argv, standalone_mode=False, prog_name="cosmic-bake")

    results = execute(recipe, steps, out, invoke, fresh=fresh)
    summary = summarize(out, results)
    text = summary_markdown(recipe, summary)
    write_text(out / "summary.md", text)
    write_json(out / "summary.json", {"tool": TOOL, **summary})
    card = out / "model" / CARD_FILE
    if card.is_file():
        write_text(out / "card.md", card_with_results(card.read_text(encoding="utf-8"), summary["rows"]))
    manifest(
        out,
        stage="run",
        source={"spec": recipe.model},
        extra={"recipe": recipe.source, "overrides": list(overrides), "steps": [s.__dict__ for s in results]},
    )
    click.echo("\n" + text)
    sys.exit(exit_code(results))
