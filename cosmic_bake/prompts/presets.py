"""System prompt presets (``preset:NAME``, files in ``prompts/system/``) and the ``--system-prompt`` value reader."""

from __future__ import annotations

from pathlib import Path

from cosmic_bake.errors import CosmicBakeError

SYSTEM_PRESETS_DIR = Path(__file__).resolve().parent / "system"


PRESET_PREFIX = "preset:"


def system_presets() -> list[str]:
    """Names of the shipped system prompts (``--system-prompt preset:NAME``)."""
    return sorted(p.stem for p in SYSTEM_PRESETS_DIR.glob("*.txt"))


def read_system_prompt(value: str | None) -> str | None:
    """``--system-prompt TEXT|@FILE|preset:NAME`` -> the system prompt text (``None``: the template's default).

    ``@FILE`` reads a UTF-8 file (trailing newlines dropped, so an editor's final newline does not
    change the prompt). ``preset:NAME`` reads a prompt shipped with cosmic-bake, e.g.
    ``preset:refuse-all``, the adversarial "complete refusal" setting of the COSMIC paper.
    """
    if value is None:
        return None
    if value.startswith(PRESET_PREFIX):
        name = value[len(PRESET_PREFIX) :]
        path = SYSTEM_PRESETS_DIR / f"{name}.txt"
        if not path.is_file():
            raise CosmicBakeError(
                f"unknown system prompt preset '{name}'",
                f"use one of: {', '.join(PRESET_PREFIX + n for n in system_presets())}",
            )
        return path.read_text(encoding="utf-8").rstrip("\n")
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        if not path.is_file():
            raise CosmicBakeError(f"system prompt file {path} not found", "pass @PATH to an existing text file")
        try:
            return path.read_text(encoding="utf-8").rstrip("\n")
        except UnicodeDecodeError:
            raise CosmicBakeError(f"system prompt file {path} is not UTF-8 text", "save it as UTF-8") from None
    return value
