"""``select`` command: choose a refusal direction and write a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cosmic_bake.cli.options import (
    cli_inputs,
    common_options,
    echo_kv,
    load_with_echo,
    parse_eval_layers,
    selection_options,
    training_sets,
)
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.builtin import DEFAULT_MODEL


@click.command("select")
@click.argument("model", default=DEFAULT_MODEL, required=False)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option(
    "--mode",
    type=click.Choice(["ablate", "affine", "ace"]),
    default="ablate",
    show_default=True,
    help="Score removal (ablate), the bakeable affine edit (affine), or the paper's one-layer ACE (ace, hook only).",
)
@click.option("--selector", type=click.Choice(["cosmic", "refusal-score"]), default="cosmic", show_default=True)
@training_sets
@selection_options
@click.option(
    "--alphas",
    default=None,
    help="--mode affine: sweep these alphas on the validation prompts and record the safest (e.g. 0.5,1,2).",
)
@click.option("--max-harmless-refusal", default=0.05, show_default=True, type=click.FloatRange(0, 1))
@click.option("--force", is_flag=True, help="Replace an earlier cosmic-bake output (or an empty folder) at -o.")
@common_options
def select_cmd(
    model,
    out,
    mode,
    selector,
    harmful,
    harmless,
    harmful_val,
    harmless_val,
    column,
    limit,
    limit_val,
    direction_method,
    eval_layers,
    kl_threshold,
    alphas,
    max_harmless_refusal,
    force,
    chat_template,
    system_prompt,
    dtype,
    batch_size,
) -> None:
    """Choose a refusal direction and its layer with COSMIC; write RUN_DIR."""
    from cosmic_bake.api import select
    from cosmic_bake.cli.options import parse_alphas
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import check_target
    from cosmic_bake.prompts.sets import prompt_sets

    inputs = [*model_inputs(model), *cli_inputs(harmful, harmless, harmful_val, harmless_val, chat_template)]
    check_target(out, force=force, inputs=inputs)
    alpha_list = parse_alphas(alphas)
    if alpha_list and mode != "affine":
        raise CosmicBakeError("--alphas applies to --mode affine", "drop --alphas, or select with --mode affine")
    prompt_sets(harmful, harmless, harmful_val, harmless_val, column, limit, limit_val)  # fail before loading
    loaded = load_with_echo(model, dtype, chat_template, system_prompt)
    select(
        model,
        out,
        harmful=harmful,
        harmless=harmless,
        harmful_val=harmful_val,
        harmless_val=harmless_val,
        column=column,
        limit=limit,
        limit_val=limit_val,
        mode=mode,
        selector=selector,
        direction_method=direction_method,
        eval_layers=parse_eval_layers(eval_layers),
        kl_threshold=kl_threshold,
        alphas=alpha_list,
        max_harmless_refusal=max_harmless_refusal,
        chat_template=chat_template,
        system_prompt=system_prompt,
        dtype=dtype,
        batch_size=batch_size,
        force=force,
        loaded=loaded,
        inputs=inputs,
    )
    result = json.loads((out / "selection.json").read_text(encoding="utf-8"))
    pos, layer = result["chosen"]["position"], result["chosen"]["layer"]
    click.echo(f"chosen: position {pos}, layer {layer} ({selector}, {mode})")
    if "alpha_sweep" in result:
        sw = result["alpha_sweep"]
        for row in sw["rows"]:
            click.echo(
                f"  alpha {row['alpha']:g}: harmful refusal {row['harmful_refusal_rate']:.3f}, harmless refusal "
                f"{row['harmless_refusal_rate']:.3f}, KL {row['harmless_kl']:.4f}"
            )
        click.echo(f"  chosen alpha: {sw['chosen_alpha']} ({sw['rule']})")
    echo_kv(
        [(k, f"{v:.4f}") for k, v in result["chosen_scores"].items()]
        + [
            ("eval layers", result["eval_layers"]),
            ("seconds", f"{result['timings']['total']:.1f}"),
            ("written", str(out)),
        ]
    )
