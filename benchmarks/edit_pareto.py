"""Issue 17's table: every removal edit on one model, the same held-out prompts, judge and machine.

    python benchmarks/edit_pareto.py --out pareto [--trials 40] [--rows NAME,...] [--heretic FOLDER]

Selection and searches see only training prompts: harmful_train[:200] (train) and [200:] (60,
validation), harmless_train (train) and harmless_val[100:] (validation). The table evaluates on
harmful_val (39) and the first 100 of harmless_val, greedy, 64 new tokens, substring judge, KL of
the first token against the unedited model, all in transformers with the edit's hook (exactly what
the baked weights compute; ``verify`` proves that per bake). ``--heretic FOLDER`` adds a model
heretic wrote (run by ``benchmarks/heretic_run.sh``; evaluated as a plain model). Each row is kept
in ``OUT/rows/NAME.json`` and skipped on a rerun; ``OUT/pareto.json`` and ``OUT/pareto.png``
(harmful refusals against harmless KL) are written at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cosmic_bake.model.hooks import Intervention
from cosmic_bake.model.session import Session
from cosmic_bake.plots import plt
from cosmic_bake.prompts.sets import load_prompts, prompt_sets
from cosmic_bake.select.candidates import Batches
from cosmic_bake.select.search import search_edit, top_candidates
from cosmic_bake.select.selection import select_sets
from cosmic_bake.verify.evaluate import evaluate, first_token_logits

MODEL = "builtin:qwen2.5-coder-0.5b-instruct"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class _Settings:
    """What ``select_sets`` reads from a settings object."""

    batch_size = 32
    kl_threshold = 0.1
    eval_layers = None
    all_scores = False

    def __init__(self, method: str) -> None:
        self.direction_method = method


def held_out_files(out: Path) -> dict[str, Path]:
    """The training-side prompt files, cut from ../shared/data into OUT (never into the project)."""
    out.mkdir(parents=True, exist_ok=True)
    harmful = json.loads((DATA / "harmful_train.json").read_text())
    harmless_val = json.loads((DATA / "harmless_val.json").read_text())
    files = {
        "harmful": (out / "harmful_train200.json", harmful[:200]),
        "harmful_val": (out / "harmful_heldout60.json", harmful[200:]),
        "harmless_val": (out / "harmless_val_after100.json", harmless_val[100:]),
    }
    for path, rows in files.values():
        path.write_text(json.dumps(rows))
    return {k: p for k, (p, _) in files.items()} | {"harmless": DATA / "harmless_train.json"}


def cached(path: Path, make):
    """``make()`` once, kept in ``path`` (a selection takes minutes; a rerun of the rows reuses it)."""
    if path.is_file():
        obj, seconds = torch.load(path, weights_only=False)
        return obj, seconds
    t = time.perf_counter()
    obj = make()
    seconds = time.perf_counter() - t
    obj.grid.kl_of = None  # a closure over the model: not kept (every KL needed is already filled in)
    torch.save((obj, seconds), path)
    return obj, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--kl-target", type=float, default=0.05)
    ap.add_argument("--limit", type=int, default=128)
    ap.add_argument("--limit-val", type=int, default=32)
    ap.add_argument("--rows", default="", help="only these rows (comma-separated names)")
    ap.add_argument("--heretic", type=Path, default=None)
    ap.add_argument("--recipe-run", type=Path, default=None, help="a run folder whose direction is removed as is")
    args = ap.parse_args()
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(filter(None, args.rows.split(",")))
    files = held_out_files(args.out / "prompts")
    harmful_eval = load_prompts(str(DATA / "harmful_val.json"))
    harmless_eval = load_prompts(str(DATA / "harmless_val.json"), limit=100)
    session = Session()
    lm, arch, fmt = session.load(MODEL)
    base_logits = first_token_logits(lm.model, fmt, harmless_eval, 16)

    def run_row(name: str, iv: Intervention | None, info: dict, model=None, f=None) -> None:
        path = rows_dir / f"{name}.json"
        if path.exists() or (wanted and name not in wanted):
            return
        t = time.perf_counter()
        rep = evaluate(
            model or lm.model,
            None if model is not None else arch,
            f or fmt,
            harmful=harmful_eval,
            harmless=harmless_eval,
            intervention=iv,
            max_new_tokens=64,
            batch_size=32,
            base_logits=base_logits,
        )
        row = {
            "name": name,
            "harmful_refused": round(rep.harmful_refusal_rate * len(harmful_eval)),
            "n_harmful": len(harmful_eval),
            "harmless_refused": round(rep.harmless_refusal_rate * len(harmless_eval)),
            "n_harmless": len(harmless_eval),
            "harmless_kl": rep.harmless_kl,
            "eval_seconds": time.perf_counter() - t,
            **info,
            "completions": rep.completions,
        }
        path.write_text(json.dumps(row, indent=1))
        print(
            f"{name}: harmful {row['harmful_refused']}/39, harmless {row['harmless_refused']}/100, "
            f"KL {rep.harmless_kl:.4f}"
        )

    run_row("unedited", None, {"edit": "none"})
    sets = prompt_sets(
        str(files["harmful"]),
        str(files["harmless"]),
        str(files["harmful_val"]),
        str(files["harmless_val"]),
        limit=args.limit,
        limit_val=args.limit_val,
    )
    for method in ("mean", "projected"):
        names = (f"cosmic-{method}", f"search-{method}", f"refusal-score-{method}")
        if all((rows_dir / f"{n}.json").exists() or (wanted and n not in wanted) for n in names):
            continue
        sel, t_sel = cached(
            args.out / f"select-{method}.pt",
            lambda m=method: select_sets(lm.model, arch, fmt, sets, _Settings(m), mode="ablate", selector="cosmic"),
        )
        pos, layer = sel.chosen
        run_row(
            f"cosmic-{method}",
            Intervention.remove(sel.direction),
            {"edit": f"full removal, {method} direction", "position": pos, "layer": layer, "select_seconds": t_sel},
        )
        if not (rows_dir / f"search-{method}.json").exists() and (not wanted or f"search-{method}" in wanted):
            val = [Batches.make(fmt, sets[k], 32, share_prefix=True) for k in ("harmful val", "harmless val")]
            total = sel.grid.first + sel.grid.second
            cands = top_candidates(total, sel.verdicts, sel.chosen, 8)
            t = time.perf_counter()
            res = search_edit(
                lm.model,
                arch,
                sel.candidates,
                *val,
                sel.eval_layers,
                cands,
                n_trials=args.trials,
                kl_target=args.kl_target,
            )
            t_search = time.perf_counter() - t
            best = res.best()
            r = sel.candidates.directions[best.position + sel.candidates.n_positions, best.layer]
            (args.out / f"search-{method}.json").write_text(json.dumps(res.to_dict(), indent=1))
            run_row(
                f"search-{method}",
                Intervention.remove(r, res.strengths()),
                {
                    "edit": f"weighted removal (searched, {args.trials} trials), {method} direction",
                    "position": best.position,
                    "layer": best.layer,
                    "strengths": [round(float(x), 4) for x in res.strengths()],
                    "search_seconds": t_search,
                    "select_seconds": t_sel,
                    "val_s_comply": best.s_comply,
                    "val_gap": best.gap,
                    "val_kl": best.kl,
                },
            )
        if method == "mean" and not (rows_dir / "refusal-score-mean.json").exists():
            rs, t_rs = cached(
                args.out / "select-refusal-score.pt",
                lambda sel=sel: select_sets(
                    lm.model,
                    arch,
                    fmt,
                    sets,
                    _Settings("mean"),
                    mode="ablate",
                    selector="refusal-score",
                    candidates=sel.candidates,
                ),
            )
            pos, layer = rs.chosen
            run_row(
                "refusal-score-mean",
                Intervention.remove(rs.direction),
                {
                    "edit": "full removal, refusal-score selector",
                    "position": pos,
                    "layer": layer,
                    "select_seconds": t_rs,
                },
            )
    if args.recipe_run is not None:
        from cosmic_bake.artifacts import Direction

        d = Direction.load(args.recipe_run)
        run_row(
            "recipe-choice",
            d.hook(),
            {"edit": f"the run {args.recipe_run.name}", "position": d.position, "layer": d.layer},
        )
    if args.heretic is not None:
        h, _, hfmt = session.load(str(args.heretic))
        run_row("heretic", None, {"edit": "heretic's abliterated model (its own search)"}, model=h.model, f=hfmt)
    rows = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    table = [{k: v for k, v in r.items() if k != "completions"} for r in rows]
    (args.out / "pareto.json").write_text(json.dumps(table, indent=1))
    plot(table, args.out / "pareto.png")
    for r in table:
        print(f"{r['name']:22} {r['harmful_refused']:>2}/39 {r['harmless_refused']:>3}/100 KL {r['harmless_kl']:.4f}")


def plot(table: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in table:
        ax.scatter(r["harmless_kl"], r["harmful_refused"], s=40)
        ax.annotate(
            f"{r['name']} ({r['harmless_refused']}/100)",
            (r["harmless_kl"], r["harmful_refused"]),
            fontsize=8,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.axvline(0.05, color="red", ls="--", lw=0.8)
    ax.axhline(2, color="red", ls="--", lw=0.8)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("harmless first-token KL (100 harmless_val)")
    ax.set_ylabel("harmful refusals (of 39 harmful_val)")
    ax.set_title("Qwen2.5-Coder-0.5B: refusals left vs damage (label: harmless refusals)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
