"""Selector comparison: COSMIC and the refusal-score baseline on the same prompts, side by side.

The candidates (differences in means) are collected once and scored by each selector; each chosen
direction is then evaluated with the same intervention on the same evaluation prompts, next to
the unedited model. This is the experiment behind the paper's headline claim: under a system
prompt that makes the model refuse everything, output-based selection loses its signal while
COSMIC, which reads only activations, still finds a direction that restores compliance.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cosmic_bake.artifacts import Direction
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.batching import generation_batch, resolve_batch_size
from cosmic_bake.model.devices import input_device
from cosmic_bake.select.candidates import SELECTORS, Batches, collect_candidates
from cosmic_bake.select.selection import select_sets
from cosmic_bake.verify.evaluate import EvalReport, evaluate, first_token_logits

if TYPE_CHECKING:
    from cosmic_bake.settings import CompareSettings


@dataclass
class CompareRow:
    """One line of the comparison table (``selector`` is ``unedited`` for the baseline)."""

    selector: str
    position: int | None
    layer: int | None
    harmful_refusal_rate: float | None
    harmless_refusal_rate: float | None
    harmless_kl: float | None
    select_seconds: float | None
    eval_seconds: float | None
    note: str = ""


@dataclass
class Comparison:
    """The table, the directions behind it and the evaluation reports (completions included)."""

    mode: str
    rows: list[CompareRow]
    directions: dict[str, Direction] = field(default_factory=dict)
    reports: dict[str, EvalReport] = field(default_factory=dict)
    candidate_seconds: float = 0.0
    eval_layers: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "candidate_seconds": self.candidate_seconds,
            "eval_layers": self.eval_layers,
            "rows": [asdict(r) for r in self.rows],
        }

    def markdown(self, title: str) -> str:
        """The table as Markdown (what people paste into notes and cards)."""
        head = "| selector | position | layer | harmful refusal | harmless refusal | harmless KL | seconds |"
        lines = [f"# {title}", "", head, "|---|---|---|---|---|---|---|"]

        def num(v, fmt):
            return "—" if v is None else format(v, fmt)

        for r in self.rows:
            seconds = sum(v for v in (r.select_seconds, r.eval_seconds) if v is not None)
            cells = [
                r.selector + (f" ({r.note})" if r.note else ""),
                num(r.position, "d"),
                num(r.layer, "d"),
                num(r.harmful_refusal_rate, ".3f"),
                num(r.harmless_refusal_rate, ".3f"),
                num(r.harmless_kl, ".4f"),
                f"{seconds:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Candidates collected once in {self.candidate_seconds:.0f} s and scored by each selector; "
            f"every direction evaluated with the baked '{self.mode}' edit's hook. "
            "Seconds = scoring + evaluation.",
        ]
        return "\n".join(lines) + "\n"


def compare(
    lm,
    arch,
    fmt,
    sets: dict[str, list[str]],
    s: CompareSettings,
    *,
    eval_harmful: list[str],
    eval_harmless: list[str],
    selectors: tuple[str, ...] = SELECTORS,
) -> Comparison:
    """Select with each selector from one set of candidates, then evaluate every choice.

    ``sets`` holds ``harmful train``, ``harmless train``, ``harmful val`` and ``harmless val`` as
    ``select`` takes them; ``s`` the command's settings (mode, batch size, selection options,
    generation length). A selector with no surviving candidate gives a row saying why instead
    of ending the comparison.
    """
    from cosmic_bake.select.run_folder import chosen_direction

    for name in selectors:
        if name not in SELECTORS:
            raise CosmicBakeError(f"unknown selector '{name}'", f"use one of {', '.join(SELECTORS)}")
    mode, max_new_tokens, device = s.mode, s.max_new_tokens, input_device(lm.model)
    batch_size = resolve_batch_size(s.batch_size, device, 32)
    t = time.perf_counter()
    cands = collect_candidates(
        lm.model,
        arch,
        fmt,
        Batches.make(fmt, sets["harmful train"], batch_size),
        Batches.make(fmt, sets["harmless train"], batch_size),
        s.direction_method,
    )
    result = Comparison(mode, [], candidate_seconds=time.perf_counter() - t)
    eval_batch = generation_batch(s.batch_size, device)
    base_logits = first_token_logits(lm.model, fmt, eval_harmless, eval_batch)
    base = evaluate(
        lm.model,
        arch,
        fmt,
        harmful=eval_harmful,
        harmless=eval_harmless,
        max_new_tokens=max_new_tokens,
        batch_size=eval_batch,
    )
    result.reports["unedited"] = base
    result.rows.append(
        CompareRow(
            "unedited", None, None, base.harmful_refusal_rate, base.harmless_refusal_rate, 0.0, None, base.seconds
        )
    )
    for selector in selectors:
        t = time.perf_counter()
        try:
            edit = "affine" if mode == "affine" else "ablate"
            sel = select_sets(lm.model, arch, fmt, sets, s, mode=edit, selector=selector, candidates=cands)
        except CosmicBakeError as err:
            result.rows.append(
                CompareRow(selector, None, None, None, None, None, time.perf_counter() - t, None, f"no choice: {err}")
            )
            continue
        select_seconds = time.perf_counter() - t
        d = chosen_direction(sel, lm, fmt).with_mode(mode, None)
        result.directions[selector] = d
        result.eval_layers[selector] = sel.eval_layers
        rep = evaluate(
            lm.model,
            arch,
            fmt,
            harmful=eval_harmful,
            harmless=eval_harmless,
            intervention=d.hook(),
            max_new_tokens=max_new_tokens,
            batch_size=eval_batch,
            base_logits=base_logits,
        )
        result.reports[selector] = rep
        pos, layer = sel.chosen
        result.rows.append(
            CompareRow(
                selector,
                pos,
                layer,
                rep.harmful_refusal_rate,
                rep.harmless_refusal_rate,
                rep.harmless_kl,
                select_seconds,
                rep.seconds,
            )
        )
    return result


def write_comparison(result: Comparison, folder: Path, title: str) -> None:
    """``compare.json``, ``compare.md``, ``compare.png``, each direction and each eval report."""
    from cosmic_bake.outputs import TOOL, write_json
    from cosmic_bake.plots import plot_comparison

    write_json(folder / "compare.json", {"tool": TOOL, **result.to_dict()})
    (folder / "compare.md").write_text(result.markdown(title), encoding="utf-8")
    rows = [r for r in result.rows if r.harmful_refusal_rate is not None]
    plot_comparison(
        [r.selector for r in rows],
        {
            "harmful refusal": [r.harmful_refusal_rate for r in rows],
            "harmless refusal": [r.harmless_refusal_rate for r in rows],
            "harmless KL": [r.harmless_kl or 0.0 for r in rows],
        },
        folder / "compare.png",
        title,
    )
    for name, d in result.directions.items():
        sub = folder / name
        sub.mkdir()
        d.save(sub)
    for name, rep in result.reports.items():
        write_json(folder / f"eval_{name}.json", {"tool": TOOL, **rep.summary(), "completions": rep.completions})
