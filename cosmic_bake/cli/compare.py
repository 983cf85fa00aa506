"""``compare`` command: both selectors on the same prompts, one table (JSON, Markdown, PNG)."""

from __future__ import annotations

from pathlib import Path

import click

from cosmic_bake.cli.options import cli_inputs, common_options, parse_eval_layers, selection_options, training_sets
from cosmic_bake.model.builtin import DEFAULT_MODEL


@click.command("compare")
@click.argument("model", default=DEFAULT_MODEL, required=False)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Folder to write.")
@click.option(
    "--mode",
    type=click.Choice(["ablate", "affine"]),
    default="ablate",
    show_default=True,
    help="Edit every chosen direction is scored and evaluated with (affine: alpha 0).",
)
@training_sets
@selection_options
@click.option("--eval-harmful", required=True, help="Harmful prompts for the refusal rates (not used to select).")
@click.option("--eval-harmless", required=True, help="Harmless prompts for refusal rate and KL (not used to select).")
@click.option("--limit-eval-harmful", default=None, type=click.IntRange(1))
@click.option("--limit-eval-harmless", default=100, show_default=True, type=click.IntRange(1))
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--force", is_flag=True, help="Replace an earlier cosmic-bake output (or an empty folder) at -o.")
@common_options
def compare_cmd(model, out, mode, force, **opts) -> None:
    """Run COSMIC and the refusal-score selector on the same prompts and compare their directions."""
    from cosmic_bake.artifacts import source_record
    from cosmic_bake.cli.options import load_with_echo
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import atomic_dir, check_target, manifest
    from cosmic_bake.prompts.sets import load_prompts, prompt_sets
    from cosmic_bake.select.compare import compare, write_comparison

    o = opts
    files = ("harmful", "harmless", "harmful_val", "harmless_val", "eval_harmful", "eval_harmless", "chat_template")
    inputs = [*model_inputs(model), *cli_inputs(*(o[k] for k in files))]
    check_target(out, force=force, inputs=inputs)
    keys = ("harmful", "harmless", "harmful_val", "harmless_val", "column", "limit", "limit_val")
    sets = prompt_sets(**{k: o[k] for k in keys})
    bad = load_prompts(o["eval_harmful"], o["column"], limit=o["limit_eval_harmful"])
    good = load_prompts(o["eval_harmless"], o["column"], limit=o["limit_eval_harmless"])
    lm, arch, fmt = load_with_echo(model, o["dtype"], o["chat_template"], o["system_prompt"])
    result = compare(
        lm,
        arch,
        fmt,
        sets,
        eval_harmful=bad,
        eval_harmless=good,
        mode=mode,
        batch_size=o["batch_size"],
        kl_threshold=o["kl_threshold"],
        eval_layers=parse_eval_layers(o["eval_layers"]),
        direction_method=o["direction_method"],
        max_new_tokens=o["max_new_tokens"],
    )
    title = f"Selectors compared on {model}" + (" (system prompt set)" if o["system_prompt"] is not None else "")
    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        write_comparison(result, tmp, title)
        manifest(
            tmp,
            stage="compare",
            source=source_record(lm.source),
            extra={
                "comparison": result.to_dict(),
                "directions": {k: d.record() for k, d in result.directions.items()},
                "settings": {"mode": mode, **opts},
            },
        )
    click.echo(result.markdown(title))
    click.echo(f"written {out} (compare.json, compare.md, compare.png, one folder per direction)")
