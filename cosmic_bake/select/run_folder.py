"""Write a selection as a run folder: direction, scores, plots and manifest, atomically."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from cosmic_bake.artifacts import DIRECTION_FILE, SELECTION_FILE, Direction, model_hash, source_record
from cosmic_bake.model.devices import input_device
from cosmic_bake.model.hooks import intervene
from cosmic_bake.outputs import TOOL, atomic_dir, manifest, write_json
from cosmic_bake.plots import plot_edit_search, plot_layer_similarities, plot_score_grids
from cosmic_bake.progress import note
from cosmic_bake.select.selection import Selection, select_sets
from cosmic_bake.sharing import portable, portable_name

if TYPE_CHECKING:
    from cosmic_bake.settings import SelectSettings


def selection_record(sel: Selection) -> dict:
    """The content of ``selection.json``."""
    pos, layer = sel.chosen
    P = sel.candidates.n_positions
    chosen_scores = {
        name: float(t[pos + P, layer])
        for name, t in zip(sel.grid.names, (sel.grid.first, sel.grid.second, sel.grid.kl))
    }
    return {
        "selector": sel.selector,
        "mode": sel.mode,
        "direction_method": sel.direction_method,
        "chosen": {"position": pos, "layer": layer},
        "chosen_scores": chosen_scores,
        "eval_layers": sel.eval_layers,
        "layer_similarities": [float(s) for s in sel.candidates.similarities],
        "positions": {str(i - P): tok for i, tok in enumerate(sel.suffix_tokens)},
        "prompt_counts": sel.counts,
        "timings": sel.timings,
        "kl_computed": {"candidates": sel.grid.n_kl, "of": sel.grid.kl.numel()},
        "kept_activation_bytes": sel.grid.kept_bytes,  # what scoring held besides the model (baselines)
        "batch_size": sel.batch_size,
        "candidates": sel.rows(),
    }


def chosen_direction(sel: Selection, lm, fmt) -> Direction:
    """The direction artifact for a selection's choice, with what is needed to reproduce it."""
    pos, layer = sel.chosen
    extra = {}
    if sel.direction_method != "mean":
        extra["direction_method"] = sel.direction_method
    if fmt.system_prompt is not None:
        extra["system_prompt"] = fmt.system_prompt
    return Direction(
        direction=sel.direction,
        reference=sel.reference,
        layer=layer,
        position=pos,
        mode=sel.mode,
        selector=sel.selector,
        alpha=0.0 if sel.mode in ("affine", "ace") else 1.0,
        model_id=portable_name(lm.source.spec),  # Hub id, builtin:NAME or file name: the artifact travels
        model_hash=model_hash(source_record(lm.source)),
        extra=extra,
    )


LOW_PRECISION_NOTE = (
    "rounded activations can change the choice (reference case: "
    "bfloat16 chose layer 11 where float32 and the official code choose 15); --dtype float32 where it fits"
)


def under_hook(s: SelectSettings, arch) -> tuple:
    """The hook ``--under RUN_DIR`` runs selection beneath: RUN_DIR's baked hook, or with
    ``--under-one-layer`` removal at the input of its layer only (the paper's jailbreak)."""
    from cosmic_bake.model.hooks import Intervention

    if s.under is None:
        return ()
    d = Direction.load(s.under)
    if s.under_one_layer:
        return (Intervention("remove_at", d.direction, d.layer),)
    return (d.hook(),)


def _sweep(lm, arch, fmt, sets, s: SelectSettings, sel, direction: Direction):
    """Sweep ``s.alphas`` with the baked hook on the validation prompts; the chosen alpha goes into ``direction``."""
    from cosmic_bake.select.sweep import sweep

    swept = sweep(
        lm.model,
        arch,
        fmt,
        direction,
        mode=s.mode,
        alphas=list(s.alphas),
        harmful=sets["harmful val"],
        harmless=sets["harmless val"],
        batch_size=sel.batch_size if input_device(lm.model).type != "cpu" else min(sel.batch_size, 16),
        max_harmless_refusal=s.max_harmless_refusal,
    )
    if swept.chosen is not None:
        direction.alpha = swept.chosen
    return swept


def _search(lm, arch, fmt, sets, s: SelectSettings, sel, direction: Direction):
    """Search the weighted removal (:mod:`cosmic_bake.select.search`) and put the chosen edit into ``direction``."""
    from cosmic_bake.model.architecture import sliding_window
    from cosmic_bake.select.candidates import Batches
    from cosmic_bake.select.search import search_edit, top_candidates

    layout = {"packed": True, "share_prefix": True, "window": sliding_window(lm.model)}
    val = [Batches.make(fmt, sets[k], sel.batch_size, **layout) for k in ("harmful val", "harmless val")]
    total = sel.grid.first + sel.grid.second if sel.selector == "cosmic" else -sel.grid.first
    cands = top_candidates(total, sel.verdicts, sel.chosen, s.search_candidates)
    res = search_edit(
        lm.model, arch, sel.candidates, *val, sel.eval_layers, cands, n_trials=s.search_trials, kl_target=s.search_kl
    )
    best = res.best()
    i = best.position + sel.candidates.n_positions
    direction.direction = sel.candidates.directions[i, best.layer]
    direction.reference = sel.candidates.harmless_mean[i, best.layer]
    direction.position, direction.layer = best.position, best.layer
    direction.strengths = res.strengths()
    direction.extra["edit"] = "weighted removal (searched)"
    return res


def run_select(
    lm, arch, fmt, sets: dict[str, list[str]], s: SelectSettings, inputs: Iterable[str | os.PathLike]
) -> dict:
    """Select as the settings ``s`` say, then write ``s.output`` (nothing is written if selection fails).

    ``s.output`` follows the output rule (:func:`cosmic_bake.outputs.check_target`) against ``inputs``.
    ``selection.json`` and the manifest name the model and prompt files by Hub id or file name
    (``push`` uploads them with a run) unless ``s.record_paths``.

    ``s.alphas`` (steering mode ``affine`` only): after the direction is chosen, sweep them on the
    validation prompts with the baked hook and record the chosen alpha (:mod:`cosmic_bake.select.sweep`).
    """
    t0 = time.perf_counter()
    dtype = arch.embed.weight.dtype
    if dtype in (torch.bfloat16, torch.float16):
        note(f"scoring in {str(dtype).removeprefix('torch.')}: {LOW_PRECISION_NOTE}")
    under = under_hook(s, arch)
    with intervene(arch, *under):  # selection, sweep and search all see the model as RUN_DIR leaves it
        sel = select_sets(lm.model, arch, fmt, sets, s, mode=s.mode, selector=s.selector)
        direction = chosen_direction(sel, lm, fmt)
        swept = _sweep(lm, arch, fmt, sets, s, sel, direction) if s.alphas else None
        searched = _search(lm, arch, fmt, sets, s, sel, direction) if s.search_trials else None
    t = time.perf_counter()
    src = source_record(lm.source, s.record_paths)
    name = portable_name(lm.source.spec)
    record = {"tool": TOOL, **selection_record(sel)}
    record["settings"] = portable(s.record(), s.record_paths)
    record["prompt_sampling"] = getattr(sets, "sampling", None)  # how each set was cut from its file
    pos, layer = sel.chosen
    if under:
        record["under"] = {"run": portable_name(str(s.under)), "one_layer": s.under_one_layer, "hook": under[0].kind}
        direction.extra["under"] = f"{portable_name(str(s.under))} ({under[0].kind})"
    if swept is not None:
        record["alpha_sweep"] = swept.to_dict()
    if searched is not None:
        record["edit_search"] = searched.to_dict()
    with atomic_dir(s.output, force=s.force, inputs=inputs) as tmp:
        direction.save(tmp)
        if swept is not None:
            from cosmic_bake.select.sweep import write_sweep

            write_sweep(swept, tmp, f"affine sweep on validation prompts, {name}")
        if searched is not None:
            res = record["edit_search"]
            plot_edit_search(
                res["trials"], res["chosen"], res["strengths"], s.search_kl, tmp / "search.png", f"edit search, {name}"
            )
        plot_layer_similarities(
            sel.candidates.similarities,
            sel.eval_layers,
            tmp / "layer_similarities.png",
            f"{name}: harmful vs harmless, last token",
        )
        plot_score_grids(
            sel.grid.named(),
            (pos + sel.candidates.n_positions, layer),
            sel.suffix_tokens,
            tmp / "scores.png",
            f"{s.selector} scores ({s.mode}) for {name}",
        )
        record["timings"]["write"] = time.perf_counter() - t
        record["timings"]["total"] = time.perf_counter() - t0
        write_json(tmp / SELECTION_FILE, record)
        manifest(
            tmp,
            stage="select",
            source=src,
            extra={
                "direction": {"file": DIRECTION_FILE, **direction.record()},
                "scores": record["chosen_scores"],
                "settings": record["settings"],
                "prompt_sampling": record["prompt_sampling"],
            },
            record_paths=s.record_paths,
        )
    return record
