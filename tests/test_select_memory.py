"""select keeps one block's inputs (plus the eval layers' outputs) for replay, and scores exactly as without replay.

Replay skips the blocks an intervention at layer ``l`` cannot change. It used to keep every
block's input for every harmless prompt (``n_layers x tokens x d``); now the record moves forward
a block at a time (:mod:`cosmic_bake.select.replay`). The scores must not change by a bit:
compared here with scoring that replays nothing (every block computed).
"""

from __future__ import annotations

import pytest
import torch

from cosmic_bake.model.architecture import probe
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.model.loading import load_model
from cosmic_bake.prompts.sets import prompt_sets
from cosmic_bake.select import scoring
from cosmic_bake.select.candidates import Batches, collect_candidates
from cosmic_bake.select.replay import BlockInputs

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 8
EVAL = [2, 5]


@pytest.fixture(scope="module")
def setup(tiny_model_factory):
    lm = load_model(str(tiny_model_factory("llama", num_layers=N_LAYERS)))
    arch, fmt = probe(lm.model), ChatFormat(lm.tokenizer)
    sets = prompt_sets("builtin:harmful", "builtin:harmless", None, None, None, 6, 4)
    batches = {k: Batches.make(fmt, v, 3) for k, v in sets.items()}
    cands = collect_candidates(lm.model, arch, fmt, batches["harmful train"], batches["harmless train"])
    return lm, arch, batches, cands


def _grids(lm, arch, batches, cands, mode: str, selector: str):
    if selector == "cosmic":
        g = scoring.score_cosmic(lm.model, arch, cands, batches["harmful val"], batches["harmless val"], EVAL, mode)
    else:
        g = scoring.score_refusal(
            lm.model, arch, lm.tokenizer, cands, batches["harmful val"], batches["harmless val"], mode
        )
    return g, torch.stack([g.first, g.second, g.kl]).nan_to_num(nan=-999.0)


@pytest.mark.parametrize(("mode", "selector"), [("ablate", "cosmic"), ("ace", "cosmic"), ("ace", "refusal-score")])
def test_replayed_scores_equal_full_passes(setup, monkeypatch, mode, selector):
    lm, arch, batches, cands = setup
    grid, replayed = _grids(lm, arch, batches, cands, mode, selector)
    monkeypatch.setattr(scoring, "_replay", lambda *a, **k: None)  # every block computed
    _, full = _grids(lm, arch, batches, cands, mode, selector)
    assert torch.equal(replayed, full)


def _tokens_bytes(batches: Batches, d: int) -> int:
    """One block's activations for every token of a prompt set (float32)."""
    return sum(int(b["input_ids"].numel()) for b in batches.encoded) * d * 4


def test_kept_activations_are_one_block_plus_the_eval_layers(setup):
    lm, arch, batches, cands = setup
    grid, _ = _grids(lm, arch, batches, cands, "ace", "cosmic")  # ace replays both validation sets
    d, vocab = arch.d_model, lm.model.get_output_embeddings().weight.shape[0]
    per_block = _tokens_bytes(batches["harmful val"], d) + _tokens_bytes(batches["harmless val"], d)
    n = len(batches["harmful val"].prompts) + len(batches["harmless val"].prompts)
    small = n * (len(EVAL) * d + vocab) * 4  # last-token outputs at eval layers, last-position logits
    # the current block, the one being made, the eval layers' outputs (an eval layer's may be the current one)
    assert grid.kept_bytes <= small + (2 + len(EVAL)) * per_block
    assert grid.kept_bytes < small + N_LAYERS * per_block  # what keeping every block's input cost


def test_block_inputs_move_forward_and_back(setup):
    """The record at each block equals the full pass's; asking for an earlier block starts over."""
    from cosmic_bake.model.forward import forward

    lm, arch, batches, _ = setup
    encoded = batches["harmless val"].encoded
    full = [forward(lm.model, arch, b, keep_full_inputs=True).full_inputs for b in encoded]
    record = BlockInputs(lm.model, arch, encoded, read_layers=EVAL)
    for layer in [*range(N_LAYERS), 3]:
        got = record.at(layer)
        assert all(torch.equal(got[b], full[b][layer]) for b in range(len(encoded)))
    assert set(record.outputs) == {2}  # eval layers passed on the way to block 3
