"""Click options generated from the settings classes, and the console helpers every command shares.

A command is ``@command_options(SelectSettings)`` over ``def select_cmd(**params)``: every field
of the settings class becomes an argument or option with its help, choices, range and default
(read from the dataclass, the only place defaults are written), and ``Settings.build`` turns the
parameters into the command's settings, so the command line, recipes and the API cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any

import click

from cosmic_bake.settings.base import Settings, members, option_of


def _click_type(hint: Any, o) -> Any:
    """The click parameter type of a field: choices, ranges and paths; text for parsed values."""
    kinds = [m for m in members(hint) if m is not type(None)]
    if o.parse is not None:
        return None
    if o.choices is not None:
        return click.Choice(list(o.choices), case_sensitive=o.case_sensitive)
    if Path in kinds:
        return click.Path(path_type=Path)
    if int in kinds:
        return click.IntRange(o.min, o.max) if (o.min, o.max) != (None, None) else int
    if float in kinds:
        return click.FloatRange(o.min, o.max) if (o.min, o.max) != (None, None) else float
    return None


def _shown(default: Any) -> Any:
    """The default as click takes it: a tuple of alphas as the text ``--alphas`` would parse."""
    if isinstance(default, tuple):
        return ",".join(f"{v:g}" if float(f"{v:g}") == v else repr(v) for v in default) or None
    return default


def _decorator(f: dataclasses.Field, hint: Any):
    o, required = option_of(f), f.default is MISSING
    if o.argument:
        kind = click.Path(path_type=Path) if hint is Path else None
        return click.argument(f.name, required=required, default=None if required else f.default, type=kind)
    names = [*([o.short] if o.short else []), o.flag or "--" + f.name.replace("_", "-")]
    default = None if required else _shown(f.default)
    kwargs: dict[str, Any] = {"help": o.help or None, "required": required, "default": default}
    if hint is bool:
        if o.secondary:
            names[-1] = f"{names[-1]}/{o.secondary}"
        else:
            kwargs["is_flag"] = True
    elif o.multiple:
        kwargs["multiple"] = True
    else:
        kwargs["type"] = _click_type(hint, o)
    kwargs["show_default"] = default not in (None, False)
    return click.option(*names, f.name, **kwargs)


def command_options(cls: type[Settings]):
    """Click arguments and options for every field of ``cls``: its own fields first, then its groups'."""
    hints = typing.get_type_hints(cls)
    own = set(inspect.get_annotations(cls))
    ordered = sorted(
        dataclasses.fields(cls), key=lambda f: (not option_of(f).argument, f.name not in own)
    )  # stable: declaration order within each rank

    def decorate(func):
        for f in reversed(ordered):
            func = _decorator(f, hints[f.name])(func)
        return func

    return decorate


def cli_session():
    """A :class:`~cosmic_bake.model.session.Session` that reports each load on stderr."""
    from cosmic_bake.model.session import Session

    return Session(echo=lambda message: click.echo(message, err=True))


def echo_table(rows: list[tuple[str, object]]) -> None:
    """``key  value`` lines, keys padded to one width."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"  {k.ljust(width)}  {v}")


def rate_text(rate: float, n: int) -> str:
    return f"{rate:.3f} ({round(rate * n)}/{n})"


def num_text(x: float | None) -> str:
    """A figure of the JSON report (None stands for a non-finite number there)."""
    return "inf" if x is None else f"{x:.3g}"
