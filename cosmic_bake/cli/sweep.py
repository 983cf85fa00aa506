"""``sweep`` command: refusal rates and KL of a steering edit over a list of alphas (JSON + PNG)."""

from __future__ import annotations

import click

from cosmic_bake.cli.options import cli_session, command_options, echo_table
from cosmic_bake.settings import SweepSettings


@click.command("sweep")
@command_options(SweepSettings)
def sweep_cmd(**params) -> None:
    """Evaluate the baked form of a steering edit at each alpha; pick the safest within the harmless cap."""
    from cosmic_bake.api import sweep

    s = SweepSettings.build(**params)
    result = sweep(s, session=cli_session())
    n = result.counts
    click.echo(f"{s.mode} sweep of {s.model} ({n.get('harmful')} harmful, {n.get('harmless')} harmless prompts)")
    click.echo("  alpha  harmful refusal  harmless refusal  harmless KL")
    for r in result.rows:
        mark = "  <- chosen" if r.alpha == result.chosen else ""
        rates = f"{r.harmful_refusal_rate:15.3f}  {r.harmless_refusal_rate:16.3f}"
        click.echo(f"  {r.alpha:5g}  {rates}  {r.harmless_kl:11.4f}{mark}")
    echo_table([("written", f"{s.output} (sweep.json, sweep.png, manifest.json)")])
