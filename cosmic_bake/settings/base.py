"""One frozen dataclass per command: the only place an option is described.

A command's settings class lists its options as fields (name, type, default, help), so the click
options (:func:`cosmic_bake.cli.options.command_options`), the recipe keys, ``--set`` overrides
and the Python API are all built from one definition and share one validation:

- :meth:`Settings.build` takes raw values from any of those sources (strings from a command
  line, TOML values from a recipe, Python values from a script), drops ``None`` (the dataclass
  default applies), refuses an unknown key in one line, converts each value to its field's type
  and checks choices and ranges;
- :meth:`Settings.record` is what every manifest stores under ``settings``;
- :meth:`Settings.argv` is the equivalent command line (what ``run`` prints for each step).

Field names are the long option names without dashes (``limit_val`` is ``--limit-val``), which
is also the recipe key, so nothing has two names.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

from cosmic_bake.errors import CosmicBakeError


@dataclass(frozen=True)
class Opt:
    """How one field appears on the command line (kept in ``field.metadata["cli"]``)."""

    help: str = ""
    short: str | None = None  # "-o"
    flag: str | None = None  # the long spelling when it is not --field-name ("--set" for run's overrides)
    choices: tuple[str, ...] | None = None
    case_sensitive: bool = True
    min: float | None = None
    max: float | None = None
    argument: bool = False  # positional (MODEL, ORIGINAL, BAKED, FOLDER, RECIPE_FILE)
    parse: Callable[[Any], Any] | None = None  # raw text / TOML value -> typed value
    secondary: str | None = None  # "--no-show-card" for a flag that is on by default
    multiple: bool = False
    inputs: str | None = None  # "file" or "model": the value names a local input the output must keep clear of
    metavar: str | None = None
    record: bool = True  # False: left out of manifests (where an output is written is not how it was made)


def opt(default: Any = MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """A settings field with its command-line description."""
    return field(default=default, metadata={"cli": Opt(help=help, **kw)})


def option_of(f: dataclasses.Field) -> Opt:
    return f.metadata.get("cli", Opt())


def _plain(value: Any) -> Any:
    """A JSON-able form: paths as text, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def members(hint: Any) -> tuple[Any, ...]:
    """The types of a hint (``int | None`` -> ``(int, NoneType)``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def coerce(command: str, name: str, hint: Any, value: Any) -> Any:
    """``value`` as the field's type, or a one-line error naming the option and what it takes."""
    kinds = [m for m in members(hint) if m is not type(None)]
    for m in kinds:
        origin = typing.get_origin(m) or m
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin is str and isinstance(value, str | os.PathLike):  # a model spec may be a path
            return os.fspath(value)
        if origin is Path and isinstance(value, str | os.PathLike):
            return Path(value)
        if origin is tuple and isinstance(value, list | tuple):
            (item, *_) = typing.get_args(m) or (Any,)
            return tuple(value if item is Any else (coerce(command, name, item, v) for v in value))
    for m in kinds:  # text from a command line or --set for a number
        origin = typing.get_origin(m) or m
        if origin in (int, float) and isinstance(value, str):
            try:
                return origin(value)
            except ValueError:
                pass
    wanted = " or ".join(_type_name(typing.get_origin(m) or m) for m in kinds)
    raise CosmicBakeError(f"{command} option '{name}' takes {wanted}, not {value!r}", f"fix '{name}'")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of every command's settings: build, validate, record, and show as a command line."""

    command: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            o, value = option_of(f), getattr(self, f.name)
            if value is None:
                continue
            if o.choices is not None:
                text = value if o.case_sensitive else str(value).lower()
                choices = o.choices if o.case_sensitive else [c.lower() for c in o.choices]
                if text not in choices:
                    raise CosmicBakeError(
                        f"{self.command} option '{f.name}' is '{value}'", f"use one of: {', '.join(o.choices)}"
                    )
                object.__setattr__(self, f.name, text)
            if o.min is not None and value < o.min or o.max is not None and value > o.max:
                span = f"at least {o.min:g}" if o.max is None else f"between {o.min:g} and {o.max:g}"
                raise CosmicBakeError(f"{self.command} option '{f.name}' is {value}", f"use a value {span}")
        self.check()

    def check(self) -> None:
        """Rules between fields (one-line errors); each command overrides what it needs."""

    @classmethod
    def hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def build(cls, **raw: Any) -> Self:
        """Settings from raw values of any source; ``None`` means "not given" (the default applies)."""
        hints, known = cls.hints(), {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise CosmicBakeError(
                f"{cls.command} has no option '{unknown[0]}'", f"options of {cls.command}: {', '.join(sorted(known))}"
            )
        values, extra = {}, []
        for name, value in raw.items():
            if value is None:
                continue
            o = option_of(known[name])
            if o.inputs == "file" and o.parse is not None:  # parsing reads the file: remember its path
                from cosmic_bake.outputs import file_inputs

                extra += file_inputs(value)
            if o.parse is not None:
                value = o.parse(value)
            values[name] = value if value is None else coerce(cls.command, name, hints[name], value)
        missing = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in missing if n not in values]
        if missing:
            raise CosmicBakeError(f"{cls.command} needs '{missing[0]}'", f"pass {_spelling(known[missing[0]])}")
        settings = cls(**values)
        object.__setattr__(settings, "_extra_inputs", tuple(extra))
        return settings

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (validated again), keeping the input files the original read."""
        new = dataclasses.replace(self, **changes)
        object.__setattr__(new, "_extra_inputs", getattr(self, "_extra_inputs", ()))
        return new

    def record(self) -> dict[str, Any]:
        """The settings as JSON-able data: the ``settings`` of every manifest and report."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if option_of(f).record}

    def group(self, base: type) -> dict[str, Any]:
        """The values of the fields that ``base`` (an option group) defines, by name."""
        return {f.name: getattr(self, f.name) for f in fields(base)}

    def inputs(self) -> list[Path]:
        """The local files and folders these settings name: the output may not be, hold or lie in one."""
        from cosmic_bake.model.loading import model_inputs
        from cosmic_bake.outputs import file_inputs

        found: list[Path] = []
        for f in fields(self):
            kind, value = option_of(f).inputs, getattr(self, f.name)
            if value is None or kind is None:
                continue
            if kind == "model":
                found += model_inputs(str(value))
            elif option_of(f).parse is None:  # parsed values (system prompt text) were recorded by build
                found += file_inputs(value)
        return [*found, *getattr(self, "_extra_inputs", ())]

    def argv(self) -> list[str]:
        """The command line that builds these settings (options left at their defaults are omitted)."""
        positional: list[str] = []
        args: list[str] = []
        for f in fields(self):
            o, value = option_of(f), getattr(self, f.name)
            if o.argument:
                positional.append(str(value))
            elif value == f.default or value is None:
                continue
            elif isinstance(value, bool):
                args.append(_spelling(f) if value else o.secondary or f"--no-{f.name.replace('_', '-')}")
            elif o.multiple:
                for v in value:
                    args += [_spelling(f), str(v)]
            elif isinstance(value, tuple):
                args += [_spelling(f), ",".join(str(v) for v in value)]
            else:
                args += [_spelling(f), str(value)]
        return positional + args


def _spelling(f: dataclasses.Field) -> str:
    o = option_of(f)
    if o.argument:
        return f.name.upper()
    return o.flag or "--" + f.name.replace("_", "-")
