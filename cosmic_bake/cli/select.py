"""``select`` command: choose a refusal direction and write a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cosmic_bake.cli.options import cli_session, command_options, echo_table
from cosmic_bake.settings import SelectSettings


@click.command("select")
@command_options(SelectSettings)
def select_cmd(**params) -> None:
    """Choose a refusal direction and its layer with COSMIC; write RUN_DIR."""
    from cosmic_bake.api import select

    s = SelectSettings.build(**params)
    show(s, select(s, session=cli_session()))


def show(s: SelectSettings, out: Path) -> None:
    """The choice, its scores and (``--alphas``) the alpha sweep, from the run folder's selection.json."""
    result = json.loads((out / "selection.json").read_text(encoding="utf-8"))
    pos, layer = result["chosen"]["position"], result["chosen"]["layer"]
    click.echo(f"chosen: position {pos}, layer {layer} ({s.selector}, {s.mode})")
    if "alpha_sweep" in result:
        sw = result["alpha_sweep"]
        for row in sw["rows"]:
            click.echo(
                f"  alpha {row['alpha']:g}: harmful refusal {row['harmful_refusal_rate']:.3f}, harmless refusal "
                f"{row['harmless_refusal_rate']:.3f}, KL {row['harmless_kl']:.4f}"
            )
        click.echo(f"  chosen alpha: {sw['chosen_alpha']} ({sw['rule']})")
    echo_table(
        [(k, f"{v:.4f}") for k, v in result["chosen_scores"].items()]
        + [
            ("eval layers", result["eval_layers"]),
            ("seconds", f"{result['timings']['total']:.1f}"),
            ("written", str(out)),
        ]
    )
