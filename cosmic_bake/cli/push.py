"""``push`` command: upload a baked model or a run folder to the Hub (``--dry-run`` lists it)."""

from __future__ import annotations

import click

from cosmic_bake.cli.options import command_options
from cosmic_bake.settings import PushSettings


@click.command("push")
@command_options(PushSettings)
def push_cmd(**params) -> None:
    """Upload FOLDER (from bake or run, or a baked .gguf) to the Hugging Face Hub, card filled from its manifest.

    Refuses, in one line, to upload a card, manifest or file that names a local path, unless the
    output was made with --record-paths (--dry-run shows the list and the card first).
    """
    from cosmic_bake.api import plan_push, push
    from cosmic_bake.export.hub_push import check_shareable, render_plan

    s = PushSettings.build(**params)
    plan = plan_push(s)
    click.echo(render_plan(plan, s.repo_id, dry_run=s.dry_run, show_card=s.show_card))
    if s.dry_run:
        check_shareable(plan)
        return
    click.echo(f"uploaded: {push(s)}")
