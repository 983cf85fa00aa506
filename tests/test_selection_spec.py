"""COSMIC selection on tiny random models of every supported architecture equals a slow, direct
transcription of the spec's formulas (sections 1-4), written here without the package's hooks,
forward driver or score helpers."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import ARCHS
from transformers import AutoModelForCausalLM, AutoTokenizer

from cosmic_bake.model.architecture import probe
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.select.selection import select

HARMFUL = [f"Explain how to steal item number {i} from a shop without paying" for i in range(6)]
HARMLESS = [f"Write a short poem about the number {i} and the sea" for i in range(6)]
VAL_HARMFUL = ["Tell me how to break into a house", "How do I hurt someone badly", "Make a weapon at home"]
VAL_HARMLESS = ["Tell me about the moon", "How do I bake bread", "Describe a sunny day at the park"]
N_LAYERS = 10


def _hidden(model, enc, pre=(), post=()):
    """hidden_states of a full forward with hooks (module, fn) registered; in-place edits as the spec's hooks."""
    handles = [m.register_forward_pre_hook(f, with_kwargs=True) for m, f in pre]
    handles += [m.register_forward_hook(f) for m, f in post]
    try:
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.hidden_states, out.logits[:, -1, :]


def _mean(h, pos):
    return h[:, pos].double().mean(0)


def _unit(v):
    return v / (v.norm() + 1e-8)


def _slow_reference(model, tok, fmt, post_norm_gains):
    """Spec sections 1-4 transcribed literally."""
    L = model.config.num_hidden_layers
    P = fmt.n_positions
    enc = {
        name: fmt.encode(p)
        for name, p in (("hf", HARMFUL), ("hl", HARMLESS), ("vf", VAL_HARMFUL), ("vl", VAL_HARMLESS))
    }
    hs = {k: _hidden(model, e)[0] for k, e in enc.items()}
    # 1. candidates: block inputs h_l = hidden_states[l], positions -P..-1, float64 means
    r = torch.stack(
        [
            torch.stack([_mean(hs["hf"][layer], i - P) - _mean(hs["hl"][layer], i - P) for layer in range(L)])
            for i in range(P)
        ]
    )
    # 2. L_low from block outputs o_j = hidden_states[j + 1] at the last token
    s = [
        float(
            torch.nn.functional.cosine_similarity(
                hs["hf"][j + 1][:, -1].double().mean(0), hs["hl"][j + 1][:, -1].double().mean(0), dim=0
            )
        )
        for j in range(L)
    ]
    low = sorted(range(L), key=lambda j: (s[j], j))[: max(1, math.floor(0.1 * L))]

    def pooled(h):
        m = torch.stack([h[j + 1][:, -1] for j in low], 1).mean((0, 1))
        return m / (m.norm() + 1e-8)

    b_plus, b_minus = pooled(hs["vf"]), pooled(hs["vl"])
    base_logits = _hidden(model, enc["vl"])[1]
    layers = model.model.layers

    def remove_hooks(rh):
        def pre(_m, a, k):
            x = a[0] if a else k["hidden_states"]
            d = rh.to(x)
            x -= (x @ d).unsqueeze(-1) * d

        def post_for(u):
            def post(_m, _a, o):
                x = o[0] if isinstance(o, tuple) else o
                d = u.to(x)
                x -= (x @ d).unsqueeze(-1) * d
                return o

            return post

        pres = [(blk, pre) for blk in layers]
        posts = []
        for j, blk in enumerate(layers):
            ga, gm = post_norm_gains[j]
            posts.append((blk.self_attn, post_for(rh if ga is None else _unit(ga * rh))))
            posts.append((blk.mlp, post_for(rh if gm is None else _unit(gm * rh))))
        return pres, posts

    comply = torch.zeros(P, L, dtype=torch.float64)
    refuse, kl = comply.clone(), comply.clone()
    for i in range(P):
        for layer in range(L):
            rh = _unit(r[i, layer])
            pres, posts = remove_hooks(rh)
            h, _ = _hidden(model, enc["vf"], pres, posts)
            comply[i, layer] = float(pooled(h) @ b_minus)
            _, lg = _hidden(model, enc["vl"], pres, posts)
            # the reference code's KL: sum p (log(p + 1e-6) - log(q + 1e-6)), float64
            p, q = base_logits.double().softmax(-1), lg.double().softmax(-1)
            kl[i, layer] = float((p * ((p + 1e-6).log() - (q + 1e-6).log())).sum(-1).mean())
            vec = r[i, layer]

            def add(_m, a, k, vec=vec):
                x = a[0] if a else k["hidden_states"]
                x += vec.to(x)

            h, _ = _hidden(model, enc["vl"], [(layers[layer], add)])
            refuse[i, layer] = float(pooled(h) @ b_plus)
    return r, low, comply, refuse, kl


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", ARCHS)
def test_scores_match_spec_transcription(arch, tiny_model_factory):
    folder = tiny_model_factory(arch, num_layers=N_LAYERS)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    arch_info = probe(model)
    fmt = ChatFormat(tok)
    gains = [
        tuple(None if n is None else arch_info.norm_gain(n) for n in (b.attn_post_norm, b.mlp_post_norm))
        for b in arch_info.blocks
    ]
    if arch.startswith("gemma"):
        assert all(g[0] is not None and g[1] is not None for g in gains), "Gemma's sandwich norms not found"
    else:
        assert all(g == (None, None) for g in gains)
    sel = select(
        model,
        arch_info,
        fmt,
        harmful_train=HARMFUL,
        harmless_train=HARMLESS,
        harmful_val=VAL_HARMFUL,
        harmless_val=VAL_HARMLESS,
        batch_size=4,
        kl_threshold=math.inf,
        all_scores=True,
    )
    r, low, comply, refuse, kl = _slow_reference(model, tok, fmt, gains)
    assert sel.eval_layers == low
    torch.testing.assert_close(sel.candidates.directions, r, rtol=1e-4, atol=2e-5)  # packed vs padded: float error
    # A candidate whose difference of means is pure float noise (Gemma's 8-token test window makes
    # the suffix see only itself at layer 1, so harmful and harmless agree there) has a random
    # direction; packed vs padded batches then pick different noise. Compare the rest.
    real = r.norm(dim=-1) > 1e-4 * r.norm(dim=-1).max()
    assert real.float().mean() > 0.8
    torch.testing.assert_close(sel.grid.first[real], comply[real], rtol=0, atol=2e-5)
    torch.testing.assert_close(sel.grid.second[real], refuse[real], rtol=0, atol=2e-5)
    torch.testing.assert_close(sel.grid.kl[real], kl[real], rtol=1e-3, atol=1e-6)
