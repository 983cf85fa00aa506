"""Alpha sweeps for steering edits: refusal rates and KL per alpha, and the rule that picks one.

The paper reports non-monotonic responses to alpha, so the user sees the whole curve (JSON and a
PNG) before a value is baked. Each alpha is evaluated with the hook of the edit that would be
baked (:meth:`~cosmic_bake.artifacts.Direction.hook`: ``add`` or the pinned ``affine``), in transformers.

Choosing alpha (``pick_alpha``) for making a model safer: the highest harmful refusal rate among
alphas whose harmless refusal rate stays at most ``max_harmless_refusal``; ties go to the lower
harmless KL. That is an output-based rule (it reads generated text), unlike COSMIC's choice of
the direction; it only picks the strength of an edit whose direction COSMIC already chose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from cosmic_bake.artifacts import Direction
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.verify.evaluate import evaluate, first_token_logits


@dataclass
class SweepRow:
    alpha: float
    harmful_refusal_rate: float
    harmless_refusal_rate: float
    harmless_kl: float
    seconds: float


@dataclass
class Sweep:
    mode: str
    rows: list[SweepRow]
    chosen: float | None
    max_harmless_refusal: float
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "chosen_alpha": self.chosen,
            "rule": f"max harmful refusal with harmless refusal <= {self.max_harmless_refusal}, then min KL",
            "counts": self.counts,
            "rows": [r.__dict__ for r in self.rows],
        }


def pick_alpha(rows: list[SweepRow], max_harmless_refusal: float) -> float | None:
    """The alpha with the most harmful refusals whose harmless refusal rate stays within the cap."""
    ok = [r for r in rows if r.harmless_refusal_rate <= max_harmless_refusal + 1e-12]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.harmful_refusal_rate, -r.harmless_kl)).alpha


def sweep(
    model,
    arch,
    fmt,
    direction: Direction,
    *,
    mode: str,
    alphas: list[float],
    harmful: list[str],
    harmless: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_harmless_refusal: float = 0.05,
) -> Sweep:
    """Evaluate ``mode`` at every alpha (transformers hooks); the unedited logits are computed once."""
    if mode not in ("add", "affine", "scale"):
        raise CosmicBakeError(f"cannot sweep alpha for mode '{mode}'", "use --mode add, affine or scale")
    if not alphas:
        raise CosmicBakeError("no alphas to sweep", "pass --alphas like 0,0.5,1,2")
    base = first_token_logits(model, fmt, harmless, batch_size)
    rows = []
    for alpha in alphas:
        t = time.perf_counter()
        iv = direction.with_mode(mode, alpha).hook()
        rep = evaluate(
            model,
            arch,
            fmt,
            harmful=harmful,
            harmless=harmless,
            intervention=iv,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            base_logits=base,
        )
        rows.append(
            SweepRow(
                alpha, rep.harmful_refusal_rate, rep.harmless_refusal_rate, rep.harmless_kl, time.perf_counter() - t
            )
        )
    counts = {"harmful": len(harmful), "harmless": len(harmless)}
    return Sweep(mode, rows, pick_alpha(rows, max_harmless_refusal), max_harmless_refusal, counts)


def write_sweep(result: Sweep, folder: Path, title: str) -> None:
    """``sweep.json`` and ``sweep.png`` into ``folder``."""
    from cosmic_bake.outputs import TOOL, write_json
    from cosmic_bake.plots import plot_metric_sweep

    write_json(folder / "sweep.json", {"tool": TOOL, **result.to_dict()})
    xs = [r.alpha for r in result.rows]
    plot_metric_sweep(
        xs,
        {
            "harmful refusal": [r.harmful_refusal_rate for r in result.rows],
            "harmless refusal": [r.harmless_refusal_rate for r in result.rows],
            "harmless KL": [r.harmless_kl for r in result.rows],
        },
        folder / "sweep.png",
        "alpha",
        title + (f" (chosen alpha {result.chosen:g})" if result.chosen is not None else " (no alpha within the cap)"),
    )
