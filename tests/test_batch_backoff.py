"""Out-of-memory back-off: a stage that runs out of accelerator memory runs again with half the batch.

The allocator limit is real in its effect, injected rather than mocked: a pre-hook on the decoder
raises ``torch.OutOfMemoryError`` (what CUDA and MPS raise) when a forward pass holds more prompts
than the "device" can take, exactly where a real allocation would fail. Selection and generation
then run for real at the smaller size; their results must equal a run started at that size.
"""

from __future__ import annotations

import pytest
import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.batching import GPU_START, resolve_batch_size, with_backoff

pytestmark = pytest.mark.usefixtures("one_thread")


class MemoryLimit:
    """At most ``prompts`` prompts per forward pass; more raise the allocator's out-of-memory error."""

    def __init__(self, model: torch.nn.Module, prompts: int) -> None:
        self.prompts = prompts
        self.refused: list[int] = []
        self.handle = model.get_decoder().register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("position_ids")
        count = ids.shape[0]
        if positions is not None:  # packed rows (stacked for several candidates): a prompt per run of positions
            row = positions[0]
            count *= 1 + int((row[1:] != row[:-1] + 1).sum())
        if count > self.prompts:
            self.refused.append(count)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {count} prompts")

    def remove(self) -> None:
        self.handle.remove()


def _select(lm, arch, fmt, batch_size: int):
    from cosmic_bake.prompts.sets import load_prompts
    from cosmic_bake.select.selection import select

    harmful, harmless = load_prompts("builtin:harmful"), load_prompts("builtin:harmless")
    return select(
        lm.model,
        arch,
        fmt,
        harmful_train=harmful[:8],
        harmless_train=harmless[:8],
        harmful_val=harmful[8:12],
        harmless_val=harmless[8:12],
        batch_size=batch_size,
    )


def test_selection_backs_off_to_the_batch_that_fits(tiny_model_factory, capsys):
    from cosmic_bake import api

    lm, arch, fmt = api.load(str(tiny_model_factory("llama")))
    limit = MemoryLimit(lm.model, prompts=2)
    try:
        limited = _select(lm, arch, fmt, batch_size=8)
    finally:
        limit.remove()
    assert limit.refused[:2] == [8, 4]  # 8 and 4 refused, then 2 fit (and scoring starts at 2)
    assert limited.batch_size == 2
    assert "out of memory with a batch of 8; retrying with 4" in capsys.readouterr().err

    direct = _select(lm, arch, fmt, batch_size=2)
    assert direct.batch_size == 2
    assert limited.chosen == direct.chosen
    grids = lambda sel: (sel.grid.first, sel.grid.second, sel.grid.kl)  # noqa: E731
    for a, b in zip(grids(limited), grids(direct), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(limited.candidates.directions, direct.candidates.directions, atol=0, rtol=0)

    whole = _select(lm, arch, fmt, batch_size=8)  # no limit: other batches, same answer to float error
    assert whole.batch_size == 8 and whole.chosen == direct.chosen
    torch.testing.assert_close(whole.grid.first, direct.grid.first, atol=1e-5, rtol=0, equal_nan=True)


def test_generation_and_logits_back_off(tiny_model_factory):
    from cosmic_bake import api
    from cosmic_bake.verify.evaluate import first_token_logits, generate

    lm, _, fmt = api.load(str(tiny_model_factory("qwen2")))
    prompts = ["Write a poem.", "How do I bake bread?", "What is the capital of France?"]
    limit = MemoryLimit(lm.model, prompts=1)
    try:
        limited = generate(lm.model, fmt, prompts, max_new_tokens=4, batch_size=4)
        logits = first_token_logits(lm.model, fmt, prompts, batch_size=4)
    finally:
        limit.remove()
    assert 3 in limit.refused and 2 in limit.refused
    direct = generate(lm.model, fmt, prompts, max_new_tokens=4, batch_size=1)
    assert limited.responses == direct.responses
    torch.testing.assert_close(logits, first_token_logits(lm.model, fmt, prompts, batch_size=1), atol=0, rtol=0)


def test_with_backoff_rules():
    sizes = []

    def fits_four(n: int) -> int:
        sizes.append(n)
        if n > 4:
            raise torch.OutOfMemoryError("out of memory")
        return n * 10

    assert with_backoff(fits_four, 16) == (40, 4)
    assert sizes == [16, 8, 4]

    def never(n: int):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(CosmicBakeError, match="out of memory with a batch of one prompt"):
        with_backoff(never, 3)

    calls = []

    def broken(n: int):
        calls.append(n)
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        with_backoff(broken, 8)
    assert calls == [8]  # anything but out-of-memory is not retried


def test_resolve_batch_size():
    assert resolve_batch_size("auto", torch.device("cpu"), 32) == 32
    assert resolve_batch_size("auto", torch.device("cuda", 0), 32) == GPU_START
    assert resolve_batch_size(None, torch.device("mps"), 8) == GPU_START
    assert resolve_batch_size(5, torch.device("cuda", 0), 32) == 5
    assert resolve_batch_size("12", torch.device("cpu"), 32) == 12
    for bad in (0, "-3", "many"):
        with pytest.raises(CosmicBakeError):
            resolve_batch_size(bad, torch.device("cpu"), 32)


def test_batch_size_option_and_generation_batches():
    """``--batch-size N|auto``: auto keeps the CPU sizes of before; generation takes at most 32 from a number."""
    from cosmic_bake.model.batching import GENERATION_CAP, generation_batch, parse_batch_size

    assert parse_batch_size("auto") == parse_batch_size(" AUTO ") == "auto"
    assert parse_batch_size("12") == parse_batch_size(12) == 12
    for bad in ("many", 0, 2.5, True):
        with pytest.raises(CosmicBakeError):
            parse_batch_size(bad)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert generation_batch("auto", cpu) == GENERATION_CAP == 32
    assert generation_batch("auto", gpu) == GPU_START
    assert generation_batch(64, cpu) == generation_batch(64, gpu) == 32
    assert generation_batch(8, gpu) == 8
