"""Prompt sets: the builtin lists and user files (``sets``), and the system prompt presets (``presets``)."""
