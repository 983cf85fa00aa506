"""COSMIC's scores, filters and choice (spec sections 2-4), as plain functions.

The model-facing code collects activations; everything that turns them into numbers and a choice
lives here, so the selection can be checked against a slow transcription of the spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math.projections import UNIT_EPS


def layer_similarities(harmful_out: torch.Tensor, harmless_out: torch.Tensor) -> torch.Tensor:
    """``s_j = cos(mean_harmful o_j, mean_harmless o_j)`` for every layer ``j``.

    ``*_out`` are the block outputs at the last token, ``[n_prompts, n_layers, d]``.
    """
    a = harmful_out.double().mean(dim=0)
    b = harmless_out.double().mean(dim=0)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def n_eval_layers(n_layers: int) -> int:
    """``max(1, floor(0.1 * L))``; integer arithmetic so it never depends on float rounding."""
    return max(1, n_layers // 10)


def eval_layers(similarities: torch.Tensor, count: int | None = None) -> list[int]:
    """L_low: the ``count`` layers with the lowest similarity, lowest first (stable on ties)."""
    count = n_eval_layers(len(similarities)) if count is None else count
    order = sorted(range(len(similarities)), key=lambda j: (float(similarities[j]), j))
    return order[:count]


def resolve_eval_layers(spec: list[int] | float | None, similarities: torch.Tensor) -> list[int]:
    """L_low from a user override: ``None`` (the paper's 10%), a fraction in (0, 1], or indices.

    The paper leaves open whether 10% of the lowest-similarity layers is the right set; this lets a
    user test other choices while the default stays the paper's.
    """
    n = len(similarities)
    if spec is None:
        return eval_layers(similarities)
    if isinstance(spec, float):
        if not 0 < spec <= 1:
            raise CosmicBakeError(f"--eval-layers fraction {spec:g} is not in (0, 1]", "pass e.g. 0.1 or 0.2")
        return eval_layers(similarities, max(1, math.floor(spec * n)))
    layers = sorted(set(int(j) for j in spec))
    if not layers or layers[0] < 0 or layers[-1] >= n:
        raise CosmicBakeError(
            f"--eval-layers {spec} is not a set of layers of this {n}-layer model", f"pass indices in 0..{n - 1}"
        )
    return layers


def pooled_unit(outputs: torch.Tensor) -> torch.Tensor:
    """Unit vector of the mean over prompts *and* layers of ``outputs`` ``[n, k, d]``.

    One vector averaged over prompts and layers, then normalised (not an average of cosines), with
    the reference code's ``+1e-8`` in the norm. Accumulated in float64 whatever the model's dtype:
    in bfloat16 a cosine near 1 moves in steps of ~0.004, about the gap between top candidates.
    """
    m = outputs.double().mean(dim=(0, 1))
    return m / (m.norm() + UNIT_EPS)


def pooled_cosine(outputs: torch.Tensor, target_unit: torch.Tensor) -> float:
    """``cos(mean over prompts and layers of outputs, target)`` with ``target`` already unit (float64)."""
    return float(pooled_unit(outputs) @ target_unit.double())


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row of next-token logits ``[n, vocab]``, in float64."""
    lp = torch.log_softmax(logits_p.double(), dim=-1)
    lq = torch.log_softmax(logits_q.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(dim=-1)


def smoothed_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The selection KL of the COSMIC and Arditi et al. code: ``sum p (log(p + eps) - log(q + eps))``.

    Used for the candidates' KL score and its 0.1 filter so that scores and choices match the
    reference implementation (the ``eps`` caps the contribution of tokens the edited model rules
    out, which changes large KLs noticeably). Reports of a finished edit use :func:`kl_divergence`.
    """
    p = torch.softmax(logits_p.double(), dim=-1)
    q = torch.softmax(logits_q.double(), dim=-1)
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(dim=-1)


def layer_cutoff(n_layers: int) -> int:
    """Candidates with ``layer >= floor(0.8 * L)`` are dropped (integer form of the spec's rule)."""
    return (4 * n_layers) // 5


def lower_median(values: list[int]) -> int:
    """Median of integers, taking the lower middle value when the count is even."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class Verdict:
    """Whether a candidate survives the filters, and if not, the first filter that removed it."""

    kept: bool
    reason: str


def filter_candidates(
    s_comply: torch.Tensor,
    s_refuse: torch.Tensor,
    kl: torch.Tensor,
    *,
    kl_threshold: float = 0.1,
    layer_fraction_cut: int | None = None,
) -> list[list[Verdict]]:
    """Apply spec section 4 to ``[P, L]`` score grids (row ``i`` is position ``i - P``).

    Returns a verdict per candidate. The median-peak filter uses argmax over all layers of the
    rows for positions ``-P..-2`` before any other filter, as the reference does.
    """
    n_pos, n_layers = s_comply.shape
    cutoff = layer_cutoff(n_layers) if layer_fraction_cut is None else layer_fraction_cut
    peak_c = peak_r = None
    if n_pos > 1:
        nan_to_low = lambda t: torch.nan_to_num(t, nan=-math.inf)  # noqa: E731
        peak_c = lower_median([int(v) for v in nan_to_low(s_comply[:-1]).argmax(dim=1)])
        peak_r = lower_median([int(v) for v in nan_to_low(s_refuse[:-1]).argmax(dim=1)])
    grid: list[list[Verdict]] = []
    for i in range(n_pos):
        row = []
        for layer in range(n_layers):
            values = (float(s_comply[i, layer]), float(s_refuse[i, layer]), float(kl[i, layer]))
            if any(math.isnan(v) for v in values):
                row.append(Verdict(False, "nan score"))
            elif layer >= cutoff:
                row.append(Verdict(False, f"layer >= {cutoff} (last 20% of layers)"))
            elif values[2] > kl_threshold:
                row.append(Verdict(False, f"KL {values[2]:.3g} > {kl_threshold:g}"))
            elif i == n_pos - 1 and peak_c is not None and layer > peak_c and layer > peak_r:
                row.append(Verdict(False, f"position -1 past the median peaks (layers {peak_c}, {peak_r})"))
            else:
                row.append(Verdict(True, "kept"))
        grid.append(row)
    return grid


def choose(total: torch.Tensor, verdicts: list[list[Verdict]]) -> tuple[int, int] | None:
    """Index ``(i, layer)`` of the kept candidate with the largest ``total``; ``None`` if none.

    Ties go to the first in (position, layer) order, like a stable sort of the reference's list.
    """
    best: tuple[float, int, int] | None = None
    for i, row in enumerate(verdicts):
        for layer, verdict in enumerate(row):
            if verdict.kept and (best is None or float(total[i, layer]) > best[0]):
                best = (float(total[i, layer]), i, layer)
    return None if best is None else (best[1], best[2])


KL_NOT_COMPUTED = "KL not computed (a candidate with a higher score passed)"


def kl_verdict(kl: float, kl_threshold: float) -> Verdict:
    """The KL part of the filters, with the same reasons :func:`filter_candidates` gives."""
    if math.isnan(kl):
        return Verdict(False, "nan score")
    if kl > kl_threshold:
        return Verdict(False, f"KL {kl:.3g} > {kl_threshold:g}")
    return Verdict(True, "kept")


def choose_visiting(
    total: torch.Tensor, verdicts: list[list[Verdict]], check: Callable[[int, int], Verdict]
) -> tuple[int, int] | None:
    """:func:`choose` when one filter (the KL) is costly: ask ``check`` only while it can matter.

    ``verdicts`` hold every other filter. The kept candidates are visited in the order
    :func:`choose` ranks them (larger ``total`` first, ties in (position, layer) order) and
    ``check`` decides each; the first it keeps is what :func:`choose` would pick had ``check``
    been applied to all, since every candidate ranked above it failed. Candidates never visited
    get :data:`KL_NOT_COMPUTED`. ``verdicts`` is updated in place.
    """
    order = sorted(
        ((float(total[i, layer]), i, layer) for i, row in enumerate(verdicts) for layer, v in enumerate(row) if v.kept),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    pick = None
    for _, i, layer in order:
        if pick is not None:
            verdicts[i][layer] = Verdict(False, KL_NOT_COMPUTED)
            continue
        verdicts[i][layer] = check(i, layer)
        if verdicts[i][layer].kept:
            pick = (i, layer)
    return pick


def refusal_gap(harmful: torch.Tensor, harmful_ref: torch.Tensor, harmless_ref: torch.Tensor) -> float:
    """How much of the harmful/harmless separation is left, along the separation itself.

    ``*`` are block outputs ``[n, k, d]`` at the evaluation layers (last token): ``harmful`` under
    an edit, the two ``*_ref`` without it. Per layer ``j``, with ``g_j`` the unedited gap between
    the harmful and harmless means, the edited harmful mean's distance past the harmless mean along
    ``g_j`` is divided by ``|g_j|``; the result is the mean over layers: 1 unchanged, 0 where the
    harmful prompts sit where the harmless ones do. Unlike ``S_comply`` (a cosine of means that
    share a large common component) it falls steadily as the edit's strength grows.
    """
    base = harmless_ref.double().mean(0)
    gap = harmful_ref.double().mean(0) - base  # [k, d]
    unit_gap = gap / (gap.norm(dim=-1, keepdim=True) + UNIT_EPS)
    left = ((harmful.double().mean(0) - base) * unit_gap).sum(-1) / (gap.norm(dim=-1) + UNIT_EPS)
    return float(left.mean())
