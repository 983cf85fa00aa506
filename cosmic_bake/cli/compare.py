"""``compare`` command: both selectors on the same prompts, one table (JSON, Markdown, PNG)."""

from __future__ import annotations

import click

from cosmic_bake.cli.options import cli_session, command_options
from cosmic_bake.settings import CompareSettings


@click.command("compare")
@command_options(CompareSettings)
def compare_cmd(**params) -> None:
    """Run COSMIC and the refusal-score selector on the same prompts and compare their directions."""
    from cosmic_bake.api import compare, compare_title

    s = CompareSettings.build(**params)
    result = compare(s, session=cli_session())
    click.echo(result.markdown(compare_title(s)))
    click.echo(f"written {s.output} (compare.json, compare.md, compare.png, one folder per direction)")
