"""Settings: one typed, frozen object per command (see :mod:`cosmic_bake.settings.base`)."""

from cosmic_bake.settings.base import Opt, Settings, opt
from cosmic_bake.settings.commands import (
    COMMANDS,
    BakeSettings,
    CompareSettings,
    EvalSettings,
    PushSettings,
    RunSettings,
    SelectSettings,
    SweepSettings,
    VerifySettings,
)

__all__ = [
    "COMMANDS",
    "BakeSettings",
    "CompareSettings",
    "EvalSettings",
    "Opt",
    "PushSettings",
    "RunSettings",
    "SelectSettings",
    "Settings",
    "SweepSettings",
    "VerifySettings",
    "opt",
]
