"""Batch sizes that fit: ``auto`` starts large on a GPU and halves on out-of-memory.

A stage is a function of its batch size (``run(size) -> result``); :func:`with_backoff` runs it,
and when the accelerator runs out of memory it frees what the failed attempt held and runs the
whole stage again with half the batch, down to one prompt. Results do not depend on the batch size
beyond float error (the means are accumulated in float64; packed prompts never see each other),
so a stage that had to back off gives the answer of a run started at the smaller size.

The check is not tied to CUDA: anything raising :class:`torch.OutOfMemoryError` (CUDA, MPS, or a
test's injected limit) takes the same path, so the logic is exercised on a CPU-only machine.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from cosmic_bake.errors import CosmicBakeError

T = TypeVar("T")

AUTO = "auto"
GPU_START = 128  # first try of ``auto`` on an accelerator: prompts per batch


def resolve_batch_size(value: int | str | None, device: torch.device, cpu_default: int) -> int:
    """The first batch size to try: ``value`` itself, or for ``auto`` (None) ``GPU_START`` on an
    accelerator and ``cpu_default`` (the command's usual size) on the CPU."""
    if value is None or value == AUTO:
        return cpu_default if torch.device(device).type == "cpu" else GPU_START
    if isinstance(value, str):
        if not value.isdigit():
            raise CosmicBakeError(f"--batch-size '{value}' is not a number", "pass a positive number or auto")
        value = int(value)
    if value < 1:
        raise CosmicBakeError(f"--batch-size {value} is not positive", "pass a positive number or auto")
    return int(value)


def parse_batch_size(value: int | str) -> int | str:
    """``--batch-size``: a positive count, or ``auto`` (resolved once the model's device is known)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool) or (isinstance(value, float) and value != int(value)):
        raise CosmicBakeError(f"--batch-size '{value}' is not a number", "pass a positive number or auto")
    return resolve_batch_size(value if isinstance(value, str) else int(value), torch.device("cpu"), 1)


GENERATION_CAP = 32  # prompts per generation batch from a number (padding grows with the batch's longest prompt)


def generation_batch(value: int | str, device: torch.device) -> int:
    """Prompts per generation / first-token batch: a number capped at :data:`GENERATION_CAP`;
    ``auto`` is that cap on the CPU and :data:`GPU_START` on an accelerator (halved on out-of-memory)."""
    size = resolve_batch_size(value, device, GENERATION_CAP)
    return size if value in (None, AUTO) else min(size, GENERATION_CAP)


def is_out_of_memory(err: BaseException) -> bool:
    """An allocator's out-of-memory error (CUDA and newer MPS raise ``torch.OutOfMemoryError``)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def release_memory() -> None:
    """Return cached accelerator memory after a failed attempt, so the retry starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def with_backoff(run: Callable[[int], T], start: int, *, what: str = "batch") -> tuple[T, int]:
    """``(run(size), size)`` for the largest ``size`` in ``start, start // 2, ... 1`` that does not run out of memory.

    The retry happens outside the ``except`` block: the exception's traceback holds the failed
    attempt's tensors, and they must be gone before the smaller batch runs.
    """
    size = max(1, int(start))
    while True:
        try:
            return run(size), size
        except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(err):
                raise
            failed = size
        release_memory()
        if failed <= 1:
            raise CosmicBakeError(
                f"out of memory with a {what} of one prompt",
                "use a device with more memory, --dtype bfloat16, or --device-map auto with --max-memory",
            )
        size = failed // 2
        print(f"out of memory with a {what} of {failed}; retrying with {size}", file=sys.stderr, flush=True)
