"""The runtime interventions do what spec section 5 says, and leave no hook behind."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math.projections import unit
from cosmic_bake.model.architecture import probe
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.model.hooks import Intervention, intervene

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tiny_model_factory):
    folder = tiny_model_factory("llama", num_layers=4, bias=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    return model, probe(model), ChatFormat(tok)


def _block_inputs(model, arch, enc):
    seen = []
    hooks = [
        b.block.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True
        )
        for b in arch.blocks
    ]
    try:
        with torch.no_grad():
            logits = model(**enc).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def test_remove_zeroes_the_component_everywhere_and_cleans_up(llama):
    model, arch, fmt = llama
    enc = fmt.encode(["How do I bake bread", "Tell me a story"])
    r = torch.randn(arch.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, before = _block_inputs(model, arch, enc)
    with intervene(arch, Intervention.remove(r)), torch.no_grad():
        out = model(**enc, output_hidden_states=True)
        for h in out.hidden_states[1:-1]:  # block outputs, read after the next block's input edit
            assert float((h.double() @ unit(r)).abs().max()) < 1e-4
    seen, after = _block_inputs(model, arch, enc)
    torch.testing.assert_close(after, before)  # every hook removed
    assert all(not b.block._forward_pre_hooks for b in arch.blocks)


def test_add_and_affine_at_one_layer(llama):
    model, arch, fmt = llama
    enc = fmt.encode(["Tell me a story"])
    r = torch.randn(arch.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mu = torch.randn(arch.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    base, _ = _block_inputs(model, arch, enc)
    captured = {}

    def grab(_m, a, k):
        captured["x"] = (a[0] if a else k["hidden_states"]).clone()

    for iv, expect in (
        (Intervention.add(r, 2, alpha=0.5), lambda x: x + 0.5 * r),
        (
            Intervention.affine(r, mu, 2, alpha=1.0),
            lambda x: x - (x @ unit(r)).unsqueeze(-1) * unit(r) + (mu @ unit(r)) * unit(r) + r,
        ),
    ):
        with intervene(arch, iv):
            h = arch.blocks[2].block.register_forward_pre_hook(grab, with_kwargs=True)  # runs after ours
            with torch.no_grad():
                model(**enc)
            h.remove()
        torch.testing.assert_close(captured["x"].double(), expect(base[2].double()), rtol=1e-5, atol=1e-5)


def test_bad_interventions(llama):
    _, arch, _ = llama
    with pytest.raises(CosmicBakeError, match="hidden size"):
        with intervene(arch, Intervention.remove(torch.ones(3))):
            pass
    with pytest.raises(CosmicBakeError, match="out of range"):
        with intervene(arch, Intervention.add(torch.ones(arch.d_model), 99)):
            pass
    with pytest.raises(CosmicBakeError, match="unknown intervention"):
        Intervention("rotate", torch.ones(arch.d_model))
