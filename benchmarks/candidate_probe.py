"""What does each candidate direction do to harmless prompts under one edit? (a selector yardstick)

It collects the difference-in-means candidates (under a system prompt, if given) and, for every
position and every second layer, counts the harmless prompts refused while the edit of that
candidate is applied (greedy, few tokens). Two uses:

* ``--edit remove --system-prompt preset:refuse-all``: which candidates, removed, restore compliance
  in the paper's adversarial "complete refusal" setting (issue 7)?
* ``--edit add``: which candidates, added with alpha 1 at their layer, induce refusal (issue 5)?

It reads output text, so it measures selectors; it is never one of them.

    python benchmarks/candidate_probe.py --edit remove --system-prompt preset:refuse-all -o probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cosmic_bake import api
from cosmic_bake.model.hooks import Intervention, intervene
from cosmic_bake.prompts.presets import read_system_prompt
from cosmic_bake.prompts.sets import load_prompts
from cosmic_bake.select.candidates import Batches, collect_candidates
from cosmic_bake.verify.evaluate import generate, is_refusal

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as reference_cosmic.py finds shared/


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--system-prompt", default=None, help="TEXT, @FILE or preset:NAME (default: the template's)")
    ap.add_argument("--edit", choices=("remove", "add"), default="remove")
    ap.add_argument("--alpha", type=float, default=1.0, help="--edit add: x + alpha * r at the candidate's layer")
    ap.add_argument("--limit", type=int, default=64, help="training prompts per set")
    ap.add_argument("--n-eval", type=int, default=12, help="harmless prompts (first of harmless_val)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--layers", default="6:22:2", help="start:stop:step")
    ap.add_argument("-o", "--output", default="candidate_probe.json")
    args = ap.parse_args()

    lm, arch, fmt = api.load(args.model, system_prompt=read_system_prompt(args.system_prompt))
    print(f"unedited first, then {args.edit} of each candidate", flush=True)
    harmless = load_prompts(f"{DATA}/harmless_val.json")[: args.n_eval]

    def refused(iv: Intervention | None) -> int:
        with intervene(arch, *([iv] if iv else [])):
            out = generate(lm.model, fmt, harmless, max_new_tokens=args.tokens, batch_size=len(harmless))
        return sum(is_refusal(r) for r in out.responses)

    t = time.perf_counter()
    result = {"system_prompt": args.system_prompt, "edit": args.edit, "n_eval": len(harmless)}
    result["unedited"] = refused(None)
    hf = load_prompts(f"{DATA}/harmful_train.json")[: args.limit]
    hl = load_prompts(f"{DATA}/harmless_train.json")[: args.limit]
    cands = collect_candidates(lm.model, arch, fmt, Batches.make(fmt, hf, 32), Batches.make(fmt, hl, 32))
    start, stop, step = (int(v) for v in args.layers.split(":"))
    P = cands.n_positions
    result["refused"] = {}
    for i in range(P):
        for layer in range(start, min(stop, arch.n_layers), step):
            r = cands.directions[i, layer]
            if float(r.norm()) > 0:
                iv = Intervention.remove(r) if args.edit == "remove" else Intervention.add(r, layer, args.alpha)
                n = result["refused"][f"{i - P},{layer}"] = refused(iv)
                print(f"({i - P}, {layer}): {n}/{len(harmless)} refused", flush=True)
    result["seconds"] = time.perf_counter() - t
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
