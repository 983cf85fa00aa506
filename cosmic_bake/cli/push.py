"""``push`` command: upload a baked model or a run folder to the Hub (``--dry-run`` lists it)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="owner/name of the Hub model repository (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", default=None, help="Branch to commit to (default: main).")
@click.option("--no-gguf", is_flag=True, help="Leave the run's GGUF files out.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded and print the card; upload nothing.")
@click.option("--show-card/--no-show-card", default=True, show_default=True, help="Print the card with --dry-run.")
def push_cmd(folder, repo_id, private, revision, no_gguf, dry_run, show_card) -> None:
    """Upload FOLDER (from bake or run) to the Hugging Face Hub, card filled from its manifest and reports."""
    import re

    from cosmic_bake.errors import CosmicBakeError
    from cosmic_bake.export.hub_push import LARGE_FILE, plan_push, push

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise CosmicBakeError(f"--repo-id '{repo_id}' is not owner/name", "e.g. --repo-id you/model-name-edited")
    plan = plan_push(folder, include_gguf=not no_gguf)
    verb = "would upload" if dry_run else "uploading"
    click.echo(f"{verb} {len(plan.files)} files, {plan.total_bytes / 2**20:.1f} MiB, to {repo_id}")
    for f in plan.files:
        lfs = "lfs" if f.size > LARGE_FILE or f.path_in_repo.endswith((".safetensors", ".gguf", ".png")) else "   "
        src = "(card)" if f.local is None else str(f.local)
        click.echo(f"  {f.size / 2**20:10.2f} MiB  {lfs}  {f.path_in_repo}  <- {src}")
    if dry_run:
        if show_card:
            click.echo("\n--- README.md (card) ---\n" + plan.card)
        return
    url = push(plan, repo_id, private=private, revision=revision, message=f"Upload {folder.name} with cosmic-bake")
    click.echo(f"uploaded: {url}")
