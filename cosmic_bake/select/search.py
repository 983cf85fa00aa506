"""Edit search (beyond the paper): a weighted removal whose direction and per-layer strengths Optuna
chooses from activations alone.

COSMIC scores a fixed edit, full removal everywhere. Here the edit has parameters: which of the
top-scoring candidates to remove, and a tent kernel of strengths over the layers
(:func:`~cosmic_bake.math.kernels.tent`: peak layer, width, weight at the peak and at the edge).
Each trial is scored as COSMIC scores a candidate, by running the validation prompts under the
edit it will bake (:class:`~cosmic_bake.model.hooks.Intervention` with ``strengths``):

* ``gap``: the share of the harmful/harmless separation left at COSMIC's evaluation layers, along
  the separation (:func:`~cosmic_bake.math.scores.refusal_gap`; 0: harmful prompts sit where
  harmless ones do), from the same pass as COSMIC's ``s_comply`` (recorded too);
* ``kl``: first-token ``KL(unedited || edited)`` on the harmless validation prompts (exact, not
  smoothed: the same figure ``eval`` reports).

No generated text is read. Optuna's multivariate TPE sampler explores the two objectives (``|gap|``
and ``kl``, both minimised); the chosen trial has the smallest ``|gap|`` among those with
``kl <= kl_target``. The first trial is plain full-strength removal of COSMIC's choice, so the
search starts from the paper's edit.

Why not ``s_comply`` alone: measured on Qwen2.5-Coder-0.5B (``benchmarks/edit_pareto.py``), the
trial with the best ``s_comply`` within KL 0.05 removed about half of the component everywhere and
left 12/39 harmful prompts refused, where full removal left 7/39: the cosine of pooled means
barely moves with strength (0.963-0.970 over 40 trials), so it cannot tell a half edit from a
whole one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from cosmic_bake.math import scores as S
from cosmic_bake.math.kernels import tent
from cosmic_bake.model.hooks import Intervention
from cosmic_bake.progress import note, progress
from cosmic_bake.select.candidates import Batches, Candidates
from cosmic_bake.select.scoring import _baseline, _run


@dataclass
class SearchTrial:
    """One scored edit."""

    number: int
    position: int  # negative, as in selection.json
    layer: int
    peak: float
    width: float
    max_weight: float
    min_weight: float
    s_comply: float
    kl: float
    gap: float = float("nan")


@dataclass
class EditSearch:
    """Every trial, and the one chosen (index into ``trials``; None if no trial meets the KL target)."""

    trials: list[SearchTrial]
    chosen: int | None
    kl_target: float
    eval_layers: list[int]
    n_layers: int
    seconds: float
    sampler: str = "optuna TPESampler(multivariate=True), objectives: minimize |gap|, minimize kl"
    notes: list[str] = field(default_factory=list)

    def best(self) -> SearchTrial:
        """The chosen trial, else the one with the lowest KL."""
        if self.chosen is not None:
            return self.trials[self.chosen]
        return min(self.trials, key=lambda t: t.kl)

    def strengths(self) -> torch.Tensor:
        t = self.best()
        return tent(self.n_layers, t.peak, t.width, t.max_weight, t.min_weight)

    def to_dict(self) -> dict:
        best = self.best()
        return {
            "sampler": self.sampler,
            "kl_target": self.kl_target,
            "eval_layers": self.eval_layers,
            "chosen_trial": None if self.chosen is None else best.number,
            "chosen": asdict(best),
            "strengths": [round(float(x), 6) for x in self.strengths()],
            "seconds": self.seconds,
            "notes": self.notes,
            "trials": [asdict(t) for t in self.trials],
        }


def top_candidates(total: torch.Tensor, verdicts, chosen: tuple[int, int], k: int) -> list[tuple[int, int]]:
    """COSMIC's choice first, then the best-scoring candidates that no filter but KL removed
    (indices ``(position index, layer)``), ``k`` in all: a weaker removal may bring a candidate
    that full removal pushes past the KL threshold back within it."""
    P = total.shape[0]
    first = (chosen[0] + P, chosen[1])

    def eligible(v) -> bool:
        return v.kept or v.reason == S.KL_NOT_COMPUTED or v.reason.startswith("KL ")

    ok = [(i, j) for i in range(P) for j in range(total.shape[1]) if eligible(verdicts[i][j]) and (i, j) != first]
    ok.sort(key=lambda ij: -float(total[ij]))
    return [first, *ok[: max(0, k - 1)]]


def search_edit(
    model,
    arch,
    cands: Candidates,
    harmful_val: Batches,
    harmless_val: Batches,
    eval_layers: list[int],
    candidates: list[tuple[int, int]],
    *,
    n_trials: int,
    kl_target: float = 0.05,
    seed: int = 0,
) -> EditSearch:
    """Run ``n_trials`` trials over ``candidates`` (``(position index, layer)``) and the kernel's parameters."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    L, P = arch.n_layers, cands.n_positions
    base_harmless = _baseline(model, arch, harmless_val, eval_layers, keep_inputs=False)
    base_harmful = _baseline(model, arch, harmful_val, eval_layers, keep_inputs=False)
    b_minus = S.pooled_unit(base_harmless.outputs)
    base_logits = torch.cat(base_harmless.logits)
    stop = max(eval_layers)

    def score(i: int, layer: int, strengths: torch.Tensor) -> tuple[float, float, float]:
        iv = Intervention.remove(cands.directions[i, layer], strengths)
        outs, _ = _run(model, arch, harmful_val, iv, layers=eval_layers, stop=stop)
        _, lg = _run(model, arch, harmless_val, iv, logits=True)
        gap = S.refusal_gap(outs, base_harmful.outputs, base_harmless.outputs)
        return S.pooled_cosine(outs, b_minus), float(S.kl_divergence(base_logits, torch.cat(lg)).mean()), gap

    sampler = optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=min(10, n_trials))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.enqueue_trial({"candidate": 0, "peak": (L - 1) / 2, "width": float(L), "max_weight": 1.0, "min_frac": 1.0})
    trials: list[SearchTrial] = []
    for n in progress(range(n_trials), "edit search (trials)"):
        trial = study.ask()
        c = trial.suggest_categorical("candidate", list(range(len(candidates))))
        peak = trial.suggest_float("peak", 0.0, L - 1.0)
        width = trial.suggest_float("width", 1.0, float(L))
        max_w = trial.suggest_float("max_weight", 0.5, 1.5)
        min_w = max_w * trial.suggest_float("min_frac", 0.0, 1.0)
        i, layer = candidates[c]
        s_comply, kl, gap = score(i, layer, tent(L, peak, width, max_w, min_w))
        study.tell(trial, [abs(gap), kl])
        trials.append(SearchTrial(n, i - P, layer, peak, width, max_w, min_w, s_comply, kl, gap))
    within = [k for k, t in enumerate(trials) if t.kl <= kl_target]
    chosen = min(within, key=lambda k: abs(trials[k].gap)) if within else None
    result = EditSearch(trials, chosen, kl_target, list(eval_layers), L, time.perf_counter() - t0)
    if chosen is None:
        msg = f"no trial reached KL <= {kl_target:g} on the validation prompts; kept the lowest KL"
        result.notes.append(msg)
        note(msg)
    return result
