"""``run`` command: one recipe from model to verified, evaluated exports (see :mod:`cosmic_bake.recipe.runner`)."""

from __future__ import annotations

import sys

import click

from cosmic_bake.cli.bake import show as show_bake
from cosmic_bake.cli.evaluate import show as show_eval
from cosmic_bake.cli.options import cli_session, command_options
from cosmic_bake.cli.select import show as show_select
from cosmic_bake.cli.verify import show as show_verify
from cosmic_bake.settings import RunSettings

SHOW = {"select": show_select, "bake": show_bake, "verify": show_verify, "eval": show_eval}


@click.command("run")
@command_options(RunSettings)
def run_cmd(**params) -> None:
    """Select, bake, export, verify and evaluate as RECIPE_FILE says; resumable."""
    from cosmic_bake.recipe.runner import run_recipe

    s = RunSettings.build(**params)
    sys.exit(run_recipe(s, show=SHOW, session=cli_session()))
