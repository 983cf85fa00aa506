"""Scoring the candidates: COSMIC's cosine-similarity scores, and the refusal-token baseline of Arditi et al."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cosmic_bake.math import scores as S
from cosmic_bake.model.forward import Recorded, forward
from cosmic_bake.model.hooks import Intervention, intervene
from cosmic_bake.progress import progress
from cosmic_bake.select.candidates import Batches, Candidates

REFUSAL_STARTS = ("I", "As")  # first tokens of "I'm sorry", "I cannot", "As an AI" ...


@dataclass
class ScoreGrid:
    """Per-candidate scores, ``[P, L]`` each; row ``i`` is position ``i - P``."""

    names: tuple[str, str, str]
    first: torch.Tensor
    second: torch.Tensor
    kl: torch.Tensor


@dataclass
class _Baseline:
    outputs: torch.Tensor  # [n, k, d] at eval layers, float32
    logits: list[torch.Tensor]  # per batch, last position
    inputs: list[list[torch.Tensor]]  # per batch, per layer: full block inputs


def _baseline(model, arch, batches: Batches, layers: list[int], keep_inputs: bool) -> _Baseline:
    outs, logits, inputs = [], [], []
    for batch in batches.encoded:
        rec = forward(model, arch, batch, output_layers=layers, logits=True, keep_full_inputs=keep_inputs)
        outs.append(rec.outputs)
        logits.append(rec.logits)
        inputs.append(rec.full_inputs)
    return _Baseline(torch.cat(outs) if layers else torch.empty(0), logits, inputs)


def _replay(base: _Baseline, b: int, layer: int, n_layers: int) -> dict[int, torch.Tensor] | None:
    """Recorded outputs of the layers before ``layer`` (output of ``j`` = input of ``j + 1``)."""
    if layer <= 0 or not base.inputs[b]:
        return None
    return {j: base.inputs[b][j + 1] for j in range(layer) if j + 1 < n_layers}


def _run(model, arch, batches: Batches, iv: Intervention, *, layers=None, logits=False, stop=None, base=None):
    """Run ``batches`` under ``iv``; returns (outputs [n,k,d] or None, list of logits)."""
    outs, lg = [], []
    single = iv.kind in ("add", "affine")  # edits at one layer: the layers before it can be replayed
    with intervene(arch, iv):
        for b, batch in enumerate(batches.encoded):
            replay = _replay(base, b, iv.layer, arch.n_layers) if (single and base is not None) else None
            rec: Recorded = forward(
                model, arch, batch, output_layers=layers, logits=logits, stop_after=stop, replay=replay
            )
            if layers:
                outs.append(rec.outputs)
            if logits:
                lg.append(rec.logits)
    return (torch.cat(outs) if outs else None), lg


def _interventions(mode: str, cands: Candidates, i: int, layer: int) -> tuple[Intervention, Intervention]:
    """(comply, refuse) interventions for candidate (i, layer) under ``mode``."""
    r = cands.directions[i, layer]
    if mode == "ablate":
        return Intervention.remove(r), Intervention.add(r, layer, 1.0)
    mu = cands.harmless_mean[i, layer]
    if mode == "affine":  # the bakeable form: select what you ship
        return Intervention.pin(r, mu, layer, 0.0), Intervention.pin(r, mu, layer, 1.0)
    return Intervention.affine(r, mu, layer, 0.0), Intervention.affine(r, mu, layer, 1.0)


def _stop_layer(eval_layers: list[int]) -> int:
    """The pass may end after the last eval layer's block (at the next block's input hooks)."""
    return max(eval_layers)


def _fill_grids(P: int, L: int, scores, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three ``[P, L]`` float64 grids filled by ``scores(i, layer) -> (a, b, c)``, with a progress bar."""
    grids = torch.full((3, P, L), math.nan, dtype=torch.float64)
    cells = [(i, layer) for i in range(P) for layer in range(L)]
    for i, layer in progress(cells, desc, total=len(cells)):
        grids[:, i, layer] = torch.tensor(scores(i, layer), dtype=torch.float64)
    return grids[0].clone(), grids[1].clone(), grids[2].clone()


def score_cosmic(
    model, arch, cands: Candidates, harmful_val: Batches, harmless_val: Batches, eval_layers: list[int], mode: str
) -> ScoreGrid:
    """S_comply, S_refuse and KL for every candidate (spec section 3)."""
    P, L = cands.n_positions, arch.n_layers
    base_harmful = _baseline(model, arch, harmful_val, eval_layers, keep_inputs=mode == "ace")
    base_harmless = _baseline(model, arch, harmless_val, eval_layers, keep_inputs=True)
    b_plus = S.pooled_unit(base_harmful.outputs)
    b_minus = S.pooled_unit(base_harmless.outputs)
    base_logits = torch.cat(base_harmless.logits)

    def scores(i: int, layer: int) -> tuple[float, float, float]:
        iv_c, iv_r = _interventions(mode, cands, i, layer)
        stop = _stop_layer(eval_layers)
        out_c, _ = _run(model, arch, harmful_val, iv_c, layers=eval_layers, stop=stop, base=base_harmful)
        _, lg = _run(model, arch, harmless_val, iv_c, logits=True, base=base_harmless)
        out_r, _ = _run(model, arch, harmless_val, iv_r, layers=eval_layers, stop=stop, base=base_harmless)
        return (
            S.pooled_cosine(out_c, b_minus),
            S.pooled_cosine(out_r, b_plus),
            float(S.smoothed_kl(base_logits, torch.cat(lg)).mean()),
        )

    comply, refuse, kl = _fill_grids(P, L, scores, "scoring candidates")
    return ScoreGrid(("s_comply", "s_refuse", "kl"), comply, refuse, kl)


def refusal_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens refusals start with ("I", "As"), found by tokenizing them."""
    ids = []
    for word in REFUSAL_STARTS:
        toks = tokenizer.encode(word, add_special_tokens=False)
        if toks and toks[0] not in ids:
            ids.append(toks[0])
    return ids


def refusal_log_odds(logits: torch.Tensor, token_ids: list[int], eps: float = 1e-8) -> torch.Tensor:
    """Arditi et al.'s refusal score: log-odds of the refusal tokens at the last position."""
    probs = torch.softmax(logits.double(), dim=-1)
    p = probs[:, token_ids].sum(dim=-1)
    return torch.log(p + eps) - torch.log(1 - p + eps)


def score_refusal(
    model, arch, tokenizer, cands: Candidates, harmful_val: Batches, harmless_val: Batches, mode: str
) -> ScoreGrid:
    """The refusal-token baseline: refusal score under removal, steering score under addition."""
    P, L = cands.n_positions, arch.n_layers
    ids = refusal_token_ids(tokenizer)
    base_harmless = _baseline(model, arch, harmless_val, [], keep_inputs=True)
    base_harmful = _baseline(model, arch, harmful_val, [], keep_inputs=mode == "ace")
    base_logits = torch.cat(base_harmless.logits)

    def scores(i: int, layer: int) -> tuple[float, float, float]:
        iv_c, iv_r = _interventions(mode, cands, i, layer)
        _, lg_h = _run(model, arch, harmful_val, iv_c, logits=True, base=base_harmful)
        _, lg_k = _run(model, arch, harmless_val, iv_c, logits=True, base=base_harmless)
        _, lg_s = _run(model, arch, harmless_val, iv_r, logits=True, base=base_harmless)
        return (
            float(refusal_log_odds(torch.cat(lg_h), ids).mean()),
            float(refusal_log_odds(torch.cat(lg_s), ids).mean()),
            float(S.smoothed_kl(base_logits, torch.cat(lg_k)).mean()),
        )

    bypass, steer, kl = _fill_grids(P, L, scores, "scoring candidates (refusal tokens)")
    return ScoreGrid(("refusal_score", "steering_score", "kl"), bypass, steer, kl)


def filter_refusal(grid: ScoreGrid, kl_threshold: float = 0.1) -> list[list[S.Verdict]]:
    """Arditi et al.'s filters: NaN, last 20% of layers, KL, and a steering score below 0."""
    P, L = grid.first.shape
    cutoff = S.layer_cutoff(L)
    out = []
    for i in range(P):
        row = []
        for layer in range(L):
            a, s, k = float(grid.first[i, layer]), float(grid.second[i, layer]), float(grid.kl[i, layer])
            if any(math.isnan(v) for v in (a, s, k)):
                row.append(S.Verdict(False, "nan score"))
            elif layer >= cutoff:
                row.append(S.Verdict(False, f"layer >= {cutoff} (last 20% of layers)"))
            elif k > kl_threshold:
                row.append(S.Verdict(False, f"KL {k:.3g} > {kl_threshold:g}"))
            elif s < 0:
                row.append(S.Verdict(False, f"steering score {s:.3g} < 0"))
            else:
                row.append(S.Verdict(True, "kept"))
        out.append(row)
    return out
