"""Scoring the candidates: COSMIC's cosine-similarity scores, and the refusal-token baseline of Arditi et al."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cosmic_bake.math import scores as S
from cosmic_bake.model.forward import Recorded, forward, stack_rows
from cosmic_bake.model.hooks import Intervention, intervene, stacked
from cosmic_bake.progress import note, progress
from cosmic_bake.select.candidates import Batches, Candidates
from cosmic_bake.select.replay import BlockInputs

REFUSAL_STARTS = ("I", "As")  # first tokens of "I'm sorry", "I cannot", "As an AI" ...


@dataclass
class ScoreGrid:
    """Per-candidate scores, ``[P, L]`` each; row ``i`` is position ``i - P``.

    ``kl`` may be computed on demand (``kl_of``): the KL pass only matters for candidates that
    can still be chosen, so :func:`cosmic_bake.select.selection.select` asks for it in order of
    the total score and stops at the first that passes. ``kl_done`` marks what was computed;
    the rest of ``kl`` is NaN.
    """

    names: tuple[str, str, str]
    first: torch.Tensor
    second: torch.Tensor
    kl: torch.Tensor
    kl_done: torch.Tensor | None = None  # bool [P, L]; None: every KL computed
    kl_of: Callable[[int, int], float] | None = field(default=None, repr=False)
    kept_bytes: int = 0  # activations the scoring kept (baselines: outputs, logits, one block's inputs)

    def __post_init__(self) -> None:
        if self.kl_done is None:
            self.kl_done = torch.ones(self.kl.shape, dtype=torch.bool)

    def fill_kl(self, i: int, layer: int) -> float:
        """KL of candidate ``(i, layer)``, computing and storing it if it was not yet."""
        if not self.kl_done[i, layer]:
            self.kl[i, layer] = self.kl_of(i, layer)
            self.kl_done[i, layer] = True
        return float(self.kl[i, layer])

    @property
    def n_kl(self) -> int:
        """How many KL scores were computed."""
        return int(self.kl_done.sum())

    def named(self) -> dict[str, torch.Tensor]:
        """The three grids by name, for plots; the KL's name says how many were computed."""
        kl = self.names[2]
        if self.n_kl < self.kl.numel():
            kl = f"{kl} ({self.n_kl} of {self.kl.numel()} computed; the rest not needed)"
        return dict(zip((self.names[0], self.names[1], kl), (self.first, self.second, self.kl)))


@dataclass
class _Baseline:
    outputs: torch.Tensor  # [n, k, d] at eval layers, float32
    logits: list[torch.Tensor]  # per batch, last position
    inputs: BlockInputs | None  # one block's input at a time, for replay (see select.replay)

    @property
    def kept_bytes(self) -> int:
        """The most activation bytes this baseline holds at once."""
        held = [self.outputs, *self.logits]
        return sum(t.numel() * t.element_size() for t in held) + (self.inputs.peak_bytes if self.inputs else 0)


def _baseline(model, arch, batches: Batches, layers: list[int], keep_inputs: bool) -> _Baseline:
    outs, logits = [], []
    for batch in batches.encoded:
        rec = forward(model, arch, batch, output_layers=layers, logits=True)
        outs.append(rec.outputs)
        logits.append(rec.logits)
    inputs = BlockInputs(model, arch, batches.encoded, layers) if keep_inputs else None
    return _Baseline(torch.cat(outs) if layers else torch.empty(0), logits, inputs)


def _replay(base: _Baseline, b: int, layer: int, n_layers: int) -> dict[int, torch.Tensor | None] | None:
    """Layers before ``layer`` replayed from the baseline (block ``layer - 1`` returns block ``layer``'s input)."""
    return base.inputs.replay(layer, b) if base.inputs is not None else None


def _run(model, arch, batches: Batches, iv: Intervention, *, layers=None, logits=False, stop=None, base=None):
    """Run ``batches`` under ``iv``; returns (outputs [n,k,d] or None, list of logits)."""
    outs, lg = _run_stacked(model, arch, batches, [iv], layers=layers, logits=logits, stop=stop, base=base)
    return outs[0], lg[0]


def stack_size(batch_size: int | None, *sets: Batches) -> int:
    """How many candidates one pass stacks: the prompts of a pass (stacked rows x the largest
    batch's prompts) stay within ``batch_size``, so out-of-memory back-off shrinks the stack too;
    at least 1, at most the positions scored together (None: no limit)."""
    encoded = [b for s in sets for b in s.encoded]
    if not all("ends" in b for b in encoded):  # left-padded batches: one pass per candidate
        return 1
    if batch_size is None:
        return 1 << 30
    largest = max((len(b["ends"]) for b in encoded), default=1)
    return max(1, int(batch_size) // max(1, largest))


def _run_chunked(model, arch, batches: Batches, ivs, per_pass: int, **kw):
    """:func:`_run_stacked` over groups of at most ``per_pass`` interventions; results in order."""
    outs, lg = [], []
    for a in range(0, len(ivs), per_pass):
        o, g = _run_stacked(model, arch, batches, list(ivs[a : a + per_pass]), **kw)
        outs += o
        lg += g
    return outs, lg


def _run_stacked(
    model, arch, batches: Batches, ivs: list[Intervention], *, layers=None, logits=False, stop=None, base=None
):
    """Run ``batches`` once under each of ``ivs`` (same kind and layer), as stacked rows of one pass
    where the batches are packed rows; returns per intervention (outputs [n,k,d] or None, logits)."""
    k = len(ivs)
    outs: list[list[torch.Tensor]] = [[] for _ in ivs]
    lg: list[list[torch.Tensor]] = [[] for _ in ivs]
    single = ivs[0].kind in ("add", "affine")  # edits at one layer: the layers before it can be replayed
    n = len(batches.encoded)
    # Taken before the hooks go in: the recorded inputs move forward without the intervention.
    layer = ivs[0].layer
    replays = [_replay(base, b, layer, arch.n_layers) if (single and base is not None) else None for b in range(n)]
    with intervene(arch, stacked(ivs) if k > 1 else ivs[0]):
        for b, batch in enumerate(batches.encoded):
            rec: Recorded = forward(
                model,
                arch,
                stack_rows(batch, k),
                output_layers=layers,
                logits=logits,
                stop_after=stop,
                replay=replays[b],
            )
            for c in range(k):
                if layers:
                    outs[c].append(rec.outputs.unflatten(0, (k, -1))[c])
                if logits:
                    lg[c].append(rec.logits.unflatten(0, (k, -1))[c])
    return [torch.cat(o) if o else None for o in outs], lg


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


def _fill_grids(P: int, L: int, scores_at, n: int, desc: str) -> list[torch.Tensor]:
    """``n`` ``[P, L]`` float64 grids filled by ``scores_at(layer) -> per position, n values``.

    Layer by layer (the replay keeps one block's inputs), all positions of a layer in one stacked
    pass per prompt set, with a progress bar counting layers.
    """
    grids = torch.full((n, P, L), math.nan, dtype=torch.float64)
    for layer in progress(range(L), desc, total=L):
        grids[:, :, layer] = torch.tensor(scores_at(layer), dtype=torch.float64).T
    return [g.clone() for g in grids]


def _timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def expected_seconds(n: int, cell: float, kl: float, all_scores: bool) -> str:
    """The line printed before scoring: ``n`` candidates at ``cell`` s each, plus ``kl`` s per KL pass.

    ``cell`` and ``kl`` come from the baseline passes just run (a comply or refuse pass runs the
    layers up to the last evaluation layer, a KL pass the whole model), so the estimate is an
    upper bound: candidates at later layers replay the layers before them.
    """
    total = n * cell + (n if all_scores else 1) * kl
    what = f"{n} KL passes" if all_scores else "one KL pass per candidate tried, best first, until one passes"
    each = f"{_duration(cell)} each, then {what}, {_duration(kl)} each"
    return f"scoring {n} candidates: about {_duration(total)} ({each})"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _grid(names, P: int, L: int, pairs, kl_of, all_scores: bool, desc: str) -> ScoreGrid:
    """The grid of ``pairs(layer) -> per position (first, second)`` and ``kl_of``: all now, or KL on demand."""
    if all_scores:

        def triples(layer: int) -> list[tuple[float, float, float]]:
            return [(*pair, kl_of(i, layer)) for i, pair in enumerate(pairs(layer))]

        first, second, kl = _fill_grids(P, L, triples, 3, desc)
        return ScoreGrid(names, first, second, kl)
    first, second = _fill_grids(P, L, pairs, 2, desc)
    kl = torch.full((P, L), math.nan, dtype=torch.float64)
    return ScoreGrid(names, first, second, kl, torch.zeros((P, L), dtype=torch.bool), kl_of)


def score_cosmic(
    model,
    arch,
    cands: Candidates,
    harmful_val: Batches,
    harmless_val: Batches,
    eval_layers: list[int],
    mode: str,
    all_scores: bool = True,
    batch_size: int | None = None,
) -> ScoreGrid:
    """S_comply and S_refuse for every candidate, and KL for all of them or on demand (spec section 3).

    The positions of a layer are stacked into one pass as far as ``batch_size`` prompts per pass allow.
    """
    P, L = cands.n_positions, arch.n_layers
    per_pass = stack_size(batch_size, harmful_val, harmless_val)
    base_harmful, t_hf = _timed(_baseline, model, arch, harmful_val, eval_layers, keep_inputs=mode == "ace")
    base_harmless, t_hl = _timed(_baseline, model, arch, harmless_val, eval_layers, keep_inputs=True)
    b_plus = S.pooled_unit(base_harmful.outputs)
    b_minus = S.pooled_unit(base_harmless.outputs)
    base_logits = torch.cat(base_harmless.logits)
    stop = _stop_layer(eval_layers)

    def pairs(layer: int) -> list[tuple[float, float]]:
        comply, refuse = zip(*(_interventions(mode, cands, i, layer) for i in range(P)))
        outs_c, _ = _run_chunked(
            model, arch, harmful_val, comply, per_pass, layers=eval_layers, stop=stop, base=base_harmful
        )
        outs_r, _ = _run_chunked(
            model, arch, harmless_val, refuse, per_pass, layers=eval_layers, stop=stop, base=base_harmless
        )
        return [(S.pooled_cosine(c, b_minus), S.pooled_cosine(r, b_plus)) for c, r in zip(outs_c, outs_r)]

    def kl_of(i: int, layer: int) -> float:
        iv_c, _ = _interventions(mode, cands, i, layer)
        _, lg = _run(model, arch, harmless_val, iv_c, logits=True, base=base_harmless)
        return float(S.smoothed_kl(base_logits, torch.cat(lg)).mean())

    part = (stop + 1) / L  # comply and refuse passes end after the last evaluation layer
    note(expected_seconds(P * L, part * (t_hf + t_hl), t_hl, all_scores))
    desc = f"scoring candidates, {min(P, per_pass)} per pass"
    grid = _grid(("s_comply", "s_refuse", "kl"), P, L, pairs, kl_of, all_scores, desc)
    grid.kept_bytes = base_harmful.kept_bytes + base_harmless.kept_bytes
    return grid


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
    model,
    arch,
    tokenizer,
    cands: Candidates,
    harmful_val: Batches,
    harmless_val: Batches,
    mode: str,
    all_scores: bool = True,
    batch_size: int | None = None,
) -> ScoreGrid:
    """The refusal-token baseline: refusal score under removal, steering score under addition."""
    P, L = cands.n_positions, arch.n_layers
    per_pass = stack_size(batch_size, harmful_val, harmless_val)
    ids = refusal_token_ids(tokenizer)
    base_harmless, t_hl = _timed(_baseline, model, arch, harmless_val, [], keep_inputs=True)
    base_harmful, t_hf = _timed(_baseline, model, arch, harmful_val, [], keep_inputs=mode == "ace")
    base_logits = torch.cat(base_harmless.logits)

    def pairs(layer: int) -> list[tuple[float, float]]:
        comply, refuse = zip(*(_interventions(mode, cands, i, layer) for i in range(P)))
        _, lg_h = _run_chunked(model, arch, harmful_val, comply, per_pass, logits=True, base=base_harmful)
        _, lg_s = _run_chunked(model, arch, harmless_val, refuse, per_pass, logits=True, base=base_harmless)
        odds = [[float(refusal_log_odds(torch.cat(lg), ids).mean()) for lg in per] for per in (lg_h, lg_s)]
        return list(zip(*odds))

    def kl_of(i: int, layer: int) -> float:
        iv_c, _ = _interventions(mode, cands, i, layer)
        _, lg_k = _run(model, arch, harmless_val, iv_c, logits=True, base=base_harmless)
        return float(S.smoothed_kl(base_logits, torch.cat(lg_k)).mean())

    note(expected_seconds(P * L, t_hf + t_hl, t_hl, all_scores))
    names = ("refusal_score", "steering_score", "kl")
    desc = f"scoring candidates (refusal tokens), {min(P, per_pass)} per pass"
    grid = _grid(names, P, L, pairs, kl_of, all_scores, desc)
    grid.kept_bytes = base_harmful.kept_bytes + base_harmless.kept_bytes
    return grid


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
