"""Choosing one direction: drop zero candidates, filter by KL and refusal, pick the best COSMIC score."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math import scores as S
from cosmic_bake.model.architecture import Architecture, sliding_window
from cosmic_bake.model.batching import with_backoff
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.select.candidates import MODES, SELECTORS, Batches, Candidates, collect_candidates
from cosmic_bake.select.scoring import ScoreGrid, filter_refusal, score_cosmic, score_refusal


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
    batch_size: int = 0  # prompts per batch that fit (after any out-of-memory back-off)

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
                if not self.grid.kl_done[i, layer]:
                    row[self.grid.names[2]] = None  # not computed: it could not change the choice
                v = self.verdicts[i][layer]
                row.update(kept=None if v.reason == S.KL_NOT_COMPUTED else v.kept, reason=v.reason)
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
    share_prefix: bool = True,
    direction_method: str = "mean",
    candidates: Candidates | None = None,
    all_scores: bool = False,
) -> Selection:
    """Run the whole selection; raises :class:`CosmicBakeError` if no candidate survives.

    ``packed=False`` runs left-padded batches exactly as the reference code does (slower).
    ``share_prefix`` computes the prompts' common token prefix (template header, system prompt)
    once per packed row (:meth:`~cosmic_bake.model.chat.ChatFormat.encode_packed`).
    ``eval_layers`` overrides L_low: explicit layer indices, or a fraction of the layers taken
    lowest similarity first (default: the paper's 10%).
    ``candidates`` reuses candidates collected before (``compare`` scores one set with both
    selectors); their training prompts must be the ones given here.
    ``all_scores=False`` computes a candidate's KL (a whole-model pass) only while it can change
    the choice (:func:`~cosmic_bake.math.scores.choose_visiting`): same choice, same scores where
    computed; ``True`` computes every KL, for the full table and plots.
    ``batch_size`` is the first size tried: a stage that runs out of accelerator memory is run
    again with half the batch (:func:`~cosmic_bake.model.batching.with_backoff`), and scoring
    starts from the size candidate collection settled on.
    """
    if mode not in MODES:
        raise CosmicBakeError(f"unknown mode '{mode}'", f"use one of {', '.join(MODES)}")
    if selector not in SELECTORS:
        raise CosmicBakeError(f"unknown selector '{selector}'", f"use one of {', '.join(SELECTORS)}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    layout = {"packed": packed, "share_prefix": share_prefix, "window": sliding_window(model)}
    sets = {
        name: Batches.make(fmt, prompts, batch_size, **layout)
        for name, prompts in (
            ("harmful_train", harmful_train),
            ("harmless_train", harmless_train),
            ("harmful_val", harmful_val),
            ("harmless_val", harmless_val),
        )
    }
    timings["tokenize"] = time.perf_counter() - t

    def batched(name: str, size: int) -> Batches:
        return sets[name] if size == batch_size else Batches.make(fmt, sets[name].prompts, size, **layout)

    t = time.perf_counter()
    cands, size = candidates, batch_size
    if cands is None:
        cands, size = with_backoff(
            lambda n: collect_candidates(
                model, arch, fmt, batched("harmful_train", n), batched("harmless_train", n), direction_method
            ),
            batch_size,
        )
    timings["candidates"] = time.perf_counter() - t
    layers = S.resolve_eval_layers(eval_layers, cands.similarities)
    t = time.perf_counter()

    def score(n: int):
        val = batched("harmful_val", n), batched("harmless_val", n)
        if selector == "cosmic":
            return score_cosmic(model, arch, cands, *val, layers, mode, all_scores, batch_size=n)
        return score_refusal(model, arch, fmt.tokenizer, cands, *val, mode, all_scores, batch_size=n)

    grid, size = with_backoff(score, size)
    if selector == "cosmic":
        total = grid.first + grid.second

        def filters(kl: torch.Tensor) -> list[list[S.Verdict]]:
            return S.filter_candidates(grid.first, grid.second, kl, kl_threshold=kl_threshold)
    else:
        total = -grid.first

        def filters(kl: torch.Tensor) -> list[list[S.Verdict]]:
            return filter_refusal(ScoreGrid(grid.names, grid.first, grid.second, kl), kl_threshold)

    timings["scoring"] = time.perf_counter() - t
    t = time.perf_counter()
    if all_scores:
        verdicts = filters(grid.kl)
        _drop_zero_directions(cands, verdicts)
        pick = S.choose(total, verdicts)
    else:  # every filter but the KL (a KL of 0 passes), then the KL in order of the total
        verdicts = filters(torch.zeros_like(grid.kl))
        _drop_zero_directions(cands, verdicts)
        pick = S.choose_visiting(total, verdicts, lambda i, j: S.kl_verdict(grid.fill_kl(i, j), kl_threshold))
        timings["kl"] = time.perf_counter() - t
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
        batch_size=size,
    )


def select_sets(
    model, arch: Architecture, fmt: ChatFormat, sets: dict[str, list[str]], s, *, mode: str, selector: str, **kw
) -> Selection:
    """:func:`select` on the four prompt sets of ``prompt_sets`` with the selection settings ``s``.

    ``s`` carries ``batch_size``, ``kl_threshold``, ``eval_layers`` and ``direction_method`` (a
    ``SelectSettings`` or ``CompareSettings``); ``kw`` passes ``candidates`` through. A
    ``batch_size`` of ``"auto"`` starts at 128 on an accelerator and 32 on the CPU.
    """
    from cosmic_bake.model.batching import resolve_batch_size
    from cosmic_bake.model.devices import input_device

    return select(
        model,
        arch,
        fmt,
        harmful_train=sets["harmful train"],
        harmless_train=sets["harmless train"],
        harmful_val=sets["harmful val"],
        harmless_val=sets["harmless val"],
        mode=mode,
        selector=selector,
        batch_size=resolve_batch_size(s.batch_size, input_device(model), 32),
        kl_threshold=s.kl_threshold,
        eval_layers=s.eval_layers,
        direction_method=s.direction_method,
        all_scores=getattr(s, "all_scores", False),  # compare writes no score table
        **kw,
    )
