"""Stage 1: prompts -> activations -> candidates -> scores -> one chosen direction.

COSMIC (spec sections 1-4) scores every (position, layer) candidate by cosine similarity of
block outputs, never by reading the model's text. The refusal-token baseline of Arditi et al.
(``selector="refusal-score"``) is here for comparison. Score with the intervention you will ship:
``mode="ablate"`` scores linear removal and addition (LCE); ``mode="affine"`` scores the affine
edit weights can carry (hook ``pin``: removal by every writer, ACE's constant at the candidate's
layer), at alpha 0 (comply) and 1 (refuse); ``mode="ace"`` scores the paper's ACE applied at the
candidate's layer only (runtime hooks only: not bakeable).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math import scores as S
from cosmic_bake.math.directions import DIRECTION_METHODS, MeanAccumulator, mean_difference, pca_direction
from cosmic_bake.model.architecture import Architecture
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.model.forward import Recorded, forward
from cosmic_bake.model.hooks import Intervention, intervene
from cosmic_bake.progress import progress

MODES = ("ablate", "affine", "ace")
SELECTORS = ("cosmic", "refusal-score")
REFUSAL_STARTS = ("I", "As")  # first tokens of "I'm sorry", "I cannot", "As an AI" ...


@dataclass
class Batches:
    """A prompt set, tokenized once into batches (in order).

    Packed by default: each batch is one unpadded row (see :meth:`ChatFormat.encode_packed`),
    which gives the same activations as left padding up to float error and skips the padding's
    compute. ``packed=False`` gives the reference code's left-padded batches.
    """

    prompts: list[str]
    encoded: list[dict[str, torch.Tensor]]

    @classmethod
    def make(cls, fmt: ChatFormat, prompts: list[str], batch_size: int, packed: bool = True) -> Batches:
        chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
        if packed:
            return cls(prompts, [fmt.encode_packed(c) for c in chunks])
        enc = [fmt.encode(c) for c in chunks]
        for e in enc:
            fmt.check_suffix(e["input_ids"])
        return cls(prompts, enc)


@dataclass
class Candidates:
    """Difference-in-means candidates at positions ``-P..-1`` of every layer's block input."""

    directions: torch.Tensor  # [P, L, d] float64, unnormalised
    harmless_mean: torch.Tensor  # [P, L, d] float64 (the affine reference point)
    harmful_mean: torch.Tensor  # [P, L, d]
    similarities: torch.Tensor  # [L] cos of harmful/harmless mean block outputs, last token

    @property
    def n_positions(self) -> int:
        return self.directions.shape[0]


def collect_candidates(
    model, arch: Architecture, fmt: ChatFormat, harmful: Batches, harmless: Batches, method: str = "mean"
) -> Candidates:
    """One pass over each training set gives both the candidates and the layer similarities.

    ``method="mean"`` is the paper's difference in means. ``method="pca"`` keeps every prompt's
    activations (float32, ``n x P x L x d`` per set) and takes the first principal component of
    the paired differences instead (:func:`~cosmic_bake.math.directions.pca_direction`); the means,
    the reference point and the layer similarities are the same either way.
    """
    if method not in DIRECTION_METHODS:
        raise CosmicBakeError(f"unknown direction method '{method}'", f"use one of {', '.join(DIRECTION_METHODS)}")
    P, L = fmt.n_positions, arch.n_layers
    means, rows = {}, {}
    for name, batches in (("harmful", harmful), ("harmless", harmless)):
        acc_in, acc_out = MeanAccumulator(), MeanAccumulator()
        kept = []
        for batch in progress(batches.encoded, f"activations ({name} train)"):
            rec = forward(model, arch, batch, input_positions=P, output_layers=list(range(L)))
            _check_finite(rec.inputs, f"{name} training activations")
            per_prompt = rec.inputs.permute(0, 2, 1, 3)  # [B, P, L, d]
            acc_in.update(per_prompt)
            acc_out.update(rec.outputs)
            if method == "pca":
                kept.append(per_prompt.float())
        means[name] = (acc_in.mean(), acc_out.mean())
        rows[name] = kept
    if method == "pca":
        directions = pca_direction(torch.cat(rows["harmful"]), torch.cat(rows["harmless"]))
    else:
        directions = mean_difference(means["harmful"][0], means["harmless"][0])
    sims = torch.nn.functional.cosine_similarity(means["harmful"][1], means["harmless"][1], dim=-1)
    return Candidates(directions, means["harmless"][0], means["harmful"][0], sims)


def _check_finite(t: torch.Tensor | None, what: str) -> None:
    if t is not None and not torch.isfinite(t).all():
        raise CosmicBakeError(
            f"NaN or infinite values in the {what}",
            "load the model in float32 (--dtype float32) or check the model files",
        )


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


@dataclass
class Selection:
    """Everything ``select`` decided, ready to be written as a run folder."""

    mode: str
    selector: str
    candidates: Candidates
    grid: ScoreGrid
    verdicts: list[list[S.Verdict]]
    eval_layers: list[int]
    chosen: tuple[int, int]  # (position, layer), position negative
    suffix_tokens: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    direction_method: str = "mean"

    @property
    def direction(self) -> torch.Tensor:
        pos, layer = self.chosen
        return self.candidates.directions[pos, layer]

    @property
    def reference(self) -> torch.Tensor:
        pos, layer = self.chosen
        return self.candidates.harmless_mean[pos, layer]

    def rows(self) -> list[dict]:
        """One dict per candidate, as ``selection.json`` lists them."""
        P, L = self.grid.first.shape
        out = []
        for i in range(P):
            for layer in range(L):
                row = {"position": i - P, "layer": layer}
                for name, t in zip(self.grid.names, (self.grid.first, self.grid.second, self.grid.kl)):
                    row[name] = float(t[i, layer])
                v = self.verdicts[i][layer]
                row.update(kept=v.kept, reason=v.reason)
                out.append(row)
        return out


ZERO_DIRECTION = 1e-6  # relative to the largest candidate's norm


def _drop_zero_directions(cands: Candidates, verdicts: list[list[S.Verdict]]) -> None:
    """Remove candidates whose difference in means is (numerically) zero.

    At layer 0 a template token after the instruction has the same embedding in every prompt, so
    its difference in means is exactly 0 and every intervention built from it is a no-op, which
    scores the baseline similarity. The reference code keeps such candidates; on a weakly aligned
    model (SmolLM2) where no edit beats the baseline for the affine form, one was chosen. A
    direction of length 0 is never a usable choice, so it is filtered (reason "zero direction").
    """
    norms = cands.directions.norm(dim=-1)
    limit = ZERO_DIRECTION * float(norms.max())
    for i, layer in (norms <= limit).nonzero().tolist():
        if verdicts[i][layer].kept:
            verdicts[i][layer] = S.Verdict(False, "zero direction")


def _no_survivor(grid: ScoreGrid, verdicts, total: torch.Tensor) -> CosmicBakeError:
    P = grid.first.shape[0]
    flat = sorted(
        (
            (float(total[i, layer]), i - P, layer, verdicts[i][layer].reason)
            for i in range(P)
            for layer in range(grid.first.shape[1])
            if not math.isnan(float(total[i, layer]))
        ),
        reverse=True,
    )[:3]
    best = "; ".join(f"({p}, {layer}) score {s:.3f} removed by {why}" for s, p, layer, why in flat)
    return CosmicBakeError(
        f"no candidate survived the filters (best: {best})",
        "use more or different prompts, or raise --kl-threshold",
    )


def select(
    model,
    arch: Architecture,
    fmt: ChatFormat,
    *,
    harmful_train: list[str],
    harmless_train: list[str],
    harmful_val: list[str],
    harmless_val: list[str],
    mode: str = "ablate",
    selector: str = "cosmic",
    batch_size: int = 32,
    kl_threshold: float = 0.1,
    eval_layers: list[int] | float | None = None,
    packed: bool = True,
    direction_method: str = "mean",
    candidates: Candidates | None = None,
) -> Selection:
    """Run the whole selection; raises :class:`CosmicBakeError` if no candidate survives.

    ``packed=False`` runs left-padded batches exactly as the reference code does (slower).
    ``eval_layers`` overrides L_low: explicit layer indices, or a fraction of the layers taken
    lowest similarity first (default: the paper's 10%).
    ``candidates`` reuses candidates collected before (``compare`` scores one set with both
    selectors); their training prompts must be the ones given here.
    """
    if mode not in MODES:
        raise CosmicBakeError(f"unknown mode '{mode}'", f"use one of {', '.join(MODES)}")
    if selector not in SELECTORS:
        raise CosmicBakeError(f"unknown selector '{selector}'", f"use one of {', '.join(SELECTORS)}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    sets = {
        name: Batches.make(fmt, prompts, batch_size, packed)
        for name, prompts in (
            ("harmful_train", harmful_train),
            ("harmless_train", harmless_train),
            ("harmful_val", harmful_val),
            ("harmless_val", harmless_val),
        )
    }
    timings["tokenize"] = time.perf_counter() - t
    t = time.perf_counter()
    cands = candidates
    if cands is None:
        cands = collect_candidates(model, arch, fmt, sets["harmful_train"], sets["harmless_train"], direction_method)
    timings["candidates"] = time.perf_counter() - t
    layers = S.resolve_eval_layers(eval_layers, cands.similarities)
    t = time.perf_counter()
    if selector == "cosmic":
        grid = score_cosmic(model, arch, cands, sets["harmful_val"], sets["harmless_val"], layers, mode)
        verdicts = S.filter_candidates(grid.first, grid.second, grid.kl, kl_threshold=kl_threshold)
        total = grid.first + grid.second
    else:
        grid = score_refusal(model, arch, fmt.tokenizer, cands, sets["harmful_val"], sets["harmless_val"], mode)
        verdicts = filter_refusal(grid, kl_threshold)
        total = -grid.first
    timings["scoring"] = time.perf_counter() - t
    _drop_zero_directions(cands, verdicts)
    pick = S.choose(total, verdicts)
    if pick is None:
        raise _no_survivor(grid, verdicts, total)
    P = cands.n_positions
    return Selection(
        mode=mode,
        selector=selector,
        candidates=cands,
        grid=grid,
        verdicts=verdicts,
        eval_layers=list(layers),
        chosen=(pick[0] - P, pick[1]),
        suffix_tokens=fmt.suffix_tokens(),
        timings=timings,
        counts={k: len(v.prompts) for k, v in sets.items()},
        direction_method=direction_method,
    )
