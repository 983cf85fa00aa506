"""The paper's make-safer protocol on the builtin Qwen (issue 18), beside cosmic-bake's own.

    python benchmarks/paper_restore.py --jailbreak RUN_DIR --out OUT [--alphas 1,2,3]

The paper's code jailbreaks an aligned model by removing its first COSMIC direction at the input
of that direction's layer only, runs COSMIC again on the jailbroken model, and adds the new
direction (``x + alpha r`` at its layer) with alpha 1..3. Here: ``select --under RUN_DIR
--under-one-layer`` on training prompts (harmful_train / harmless_train, validation held out of
them), then ``eval`` on harmful_val (39) and the first 100 of harmless_val with both hooks on,
greedy, 64 new tokens, KL against the original model. Writes OUT/paper_restore.json and a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cosmic_bake import api
from cosmic_bake.artifacts import Direction
from cosmic_bake.model.hooks import Intervention
from cosmic_bake.model.session import Session
from cosmic_bake.prompts.sets import load_prompts
from cosmic_bake.verify.evaluate import evaluate, first_token_logits

MODEL = "builtin:qwen2.5-coder-0.5b-instruct"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jailbreak", type=Path, required=True, help="run folder whose direction is removed at its layer")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--alphas", default="1,2,3")
    ap.add_argument("--limit", type=int, default=128)
    ap.add_argument("--limit-val", type=int, default=16)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session()
    lm, arch, fmt = session.load(MODEL)
    run = args.out / "select-under"
    if not (run / "direction.safetensors").is_file():
        api.select(
            MODEL,
            run,
            session=session,
            mode="ablate",
            harmful=str(DATA / "harmful_train.json"),
            harmless=str(DATA / "harmless_train.json"),
            limit=args.limit,
            limit_val=args.limit_val,
            under=args.jailbreak,
            under_one_layer=True,
            force=True,
        )
    old, new = Direction.load(args.jailbreak), Direction.load(run)
    jailbreak = Intervention("remove_at", old.direction, old.layer)
    harmful = load_prompts(str(DATA / "harmful_val.json"))
    harmless = load_prompts(str(DATA / "harmless_val.json"), limit=100)
    base = first_token_logits(lm.model, fmt, harmless, 16)
    rows = []
    for alpha in [0.0, *(float(a) for a in args.alphas.split(","))]:
        t = time.perf_counter()
        ivs = [jailbreak] + ([Intervention.add(new.direction, new.layer, alpha)] if alpha else [])
        rep = _evaluate_under(lm.model, arch, fmt, harmful, harmless, ivs, base)
        rows.append(
            {
                "alpha": alpha,
                "harmful_refused": round(rep.harmful_refusal_rate * len(harmful)),
                "harmless_refused": round(rep.harmless_refusal_rate * len(harmless)),
                "harmless_kl_to_original": rep.harmless_kl,
                "seconds": time.perf_counter() - t,
            }
        )
        print(rows[-1], flush=True)
        (args.out / "paper_restore.json").write_text(
            json.dumps(
                {
                    "jailbreak": {"position": old.position, "layer": old.layer, "hook": "remove_at"},
                    "restore": {"position": new.position, "layer": new.layer, "edit": "add alpha r"},
                    "rows": rows,
                },
                indent=1,
            )
        )


def _evaluate_under(model, arch, fmt, harmful, harmless, ivs, base):
    """``evaluate`` with several hooks at once (the jailbreak and the restoring addition)."""
    from cosmic_bake.model.hooks import intervene

    with intervene(arch, *ivs[:-1]):
        return evaluate(
            model, arch, fmt, harmful=harmful, harmless=harmless, intervention=ivs[-1], batch_size=32, base_logits=base
        )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
