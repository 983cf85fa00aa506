"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core to parallel jobs).

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the real-model
    tests keep both threads.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(arch, **kw) -> Path``: a saved tiny random HF model folder (see tests/tiny_models.py).

    ``kw`` are ``make_tiny_model``'s keyword arguments (tied, bias, seed, num_layers, dtype,
    shard_size). Folders are built once per (arch, kw) per session and shared, so treat them as
    read-only; copy one before modifying it.
    """
    from tiny_models import make_tiny_model

    cache: dict[tuple, Path] = {}

    def factory(arch: str, **kw) -> Path:
        key = (arch, tuple(sorted((name, repr(value)) for name, value in kw.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[key] = make_tiny_model(arch, folder, **kw)
        return cache[key]

    return factory
