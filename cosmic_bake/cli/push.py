"""``push`` command: upload a baked model or a run folder to the Hub (``--dry-run`` lists it)."""

from __future__ import annotations

import click

from cosmic_bake.cli.options import command_options
from cosmic_bake.settings import PushSettings


@click.command("push")
@command_options(PushSettings)
def push_cmd(**params) -> None:
    """Upload FOLDER (from bake or run) to the Hugging Face Hub, card filled from its manifest and reports."""
    from cosmic_bake.api import plan_push, push
    from cosmic_bake.export.hub_push import LARGE_FILE

    s = PushSettings.build(**params)
    plan = plan_push(s)
    verb = "would upload" if s.dry_run else "uploading"
    click.echo(f"{verb} {len(plan.files)} files, {plan.total_bytes / 2**20:.1f} MiB, to {s.repo_id}")
    for f in plan.files:
        lfs = "lfs" if f.size > LARGE_FILE or f.path_in_repo.endswith((".safetensors", ".gguf", ".png")) else "   "
        src = "(card)" if f.local is None else str(f.local)
        click.echo(f"  {f.size / 2**20:10.2f} MiB  {lfs}  {f.path_in_repo}  <- {src}")
    if s.dry_run:
        if s.show_card:
            click.echo("\n--- README.md (card) ---\n" + plan.card)
        return
    click.echo(f"uploaded: {push(s)}")
