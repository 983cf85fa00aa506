"""Click option groups shared by several commands (one definition, the same help everywhere)."""

from __future__ import annotations

import click


def eval_sets(f):
    """The prompt-set and generation options shared by ``eval`` and ``sweep``."""
    options = [
        click.option("--harmful", default="builtin:harmful", show_default=True),
        click.option("--harmless", default="builtin:harmless", show_default=True),
        click.option("--column", default=None),
        click.option("--limit-harmful", default=None, type=click.IntRange(1)),
        click.option("--limit-harmless", default=100, show_default=True, type=click.IntRange(1)),
        click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1)),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def common_options(f):
    """Model-loading options shared by every command that loads a model for hooks."""
    options = [
        click.option(
            "--chat-template", default=None, help="Jinja template or format string with {instruction} (FILE or STRING)."
        ),
        click.option("--system-prompt", default=None, help="System prompt (replaces the template's default)."),
        click.option(
            "--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"])
        ),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096)),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f
