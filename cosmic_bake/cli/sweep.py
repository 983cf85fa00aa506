"""``sweep`` command: refusal rates and KL of a steering edit over a list of alphas (JSON + PNG)."""

from __future__ import annotations

from pathlib import Path

import click

from cosmic_bake.cli.options import cli_inputs, common_options, eval_sets, parse_alphas


@click.command("sweep")
@click.argument("model")
@click.option("--direction", "run_dir", required=True, type=click.Path(path_type=Path), help="RUN_DIR from select.")
@click.option("--mode", type=click.Choice(["add", "affine", "scale"]), default="affine", show_default=True)
@click.option("--alphas", default="0,0.5,1,1.5,2", show_default=True, help="Comma-separated alphas.")
@eval_sets
@click.option("--max-harmless-refusal", default=0.05, show_default=True, type=click.FloatRange(0, 1))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Folder to write.")
@click.option("--force", is_flag=True, help="Replace an earlier cosmic-bake output (or an empty folder) at -o.")
@common_options
def sweep_cmd(
    model,
    run_dir,
    mode,
    alphas,
    harmful,
    harmless,
    column,
    limit_harmful,
    limit_harmless,
    max_new_tokens,
    max_harmless_refusal,
    out,
    force,
    chat_template,
    system_prompt,
    dtype,
    batch_size,
) -> None:
    """Evaluate the baked form of a steering edit at each alpha; pick the safest within the harmless cap."""
    from cosmic_bake.artifacts import Direction, source_record
    from cosmic_bake.cli.options import echo_kv, load_with_echo
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import atomic_dir, check_target, manifest
    from cosmic_bake.prompts.sets import load_prompts
    from cosmic_bake.select.sweep import sweep, write_sweep

    values = parse_alphas(alphas)
    inputs = [*model_inputs(model), *cli_inputs(run_dir, harmful, harmless, chat_template)]
    check_target(out, force=force, inputs=inputs)
    d = Direction.load(run_dir)
    bad = load_prompts(harmful, column, limit=limit_harmful)
    good = load_prompts(harmless, column, limit=limit_harmless)
    lm, arch, fmt = load_with_echo(model, dtype, chat_template, system_prompt)
    result = sweep(
        lm.model,
        arch,
        fmt,
        d,
        mode=mode,
        alphas=values,
        harmful=bad,
        harmless=good,
        max_new_tokens=max_new_tokens,
        batch_size=min(batch_size, 32),
        max_harmless_refusal=max_harmless_refusal,
    )
    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        write_sweep(result, tmp, f"{mode} sweep, {model}")
        manifest(
            tmp,
            stage="sweep",
            source=source_record(lm.source),
            extra={
                "direction": d.record(),
                "sweep": result.to_dict(),
                "prompts": {"harmful": harmful, "harmless": harmless},
            },
        )
    click.echo(f"{mode} sweep of {model} ({len(bad)} harmful, {len(good)} harmless prompts)")
    click.echo("  alpha  harmful refusal  harmless refusal  harmless KL")
    for r in result.rows:
        mark = "  <- chosen" if r.alpha == result.chosen else ""
        rates = f"{r.harmful_refusal_rate:15.3f}  {r.harmless_refusal_rate:16.3f}"
        click.echo(f"  {r.alpha:5g}  {rates}  {r.harmless_kl:11.4f}{mark}")
    echo_kv([("written", f"{out} (sweep.json, sweep.png, manifest.json)")])
