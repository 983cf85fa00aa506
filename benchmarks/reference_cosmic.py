"""Faithfulness and speed against the official COSMIC code (``../shared/reference``).

Runs ``cosmic-bake select`` on exactly the reference's prompts and chat format, then compares the
evaluation layers, every candidate's S_comply / S_refuse / KL and the choice with what the paper's
code computed, and reports wall time and peak memory against the reference's 1235 s.

    python benchmarks/reference_cosmic.py [--reference DIR] [--out results.json] [--all-scores]
        [--dtype float32 --dtype bfloat16]

With two ``--dtype`` runs it also prints what the second changes against the first: the same
choice and evaluation layers?, the largest difference of each score and where.

By default select computes a candidate's KL only while it can change the choice; the scores it did
not compute (``null`` in selection.json) are left out of the comparison and counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cosmic-qwen2.5-coder-0.5b-lce"
TEMPLATE = r"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
REFERENCE_SECONDS = 1235.0


def run_select(ref: Path, model: str, all_scores: bool, dtype: str | None, tmp: Path) -> tuple[dict, float, float]:
    """One ``cosmic-bake select`` on the reference inputs: (selection.json, wall seconds, peak RSS GiB)."""
    run = tmp / f"run-{dtype or 'default'}"
    files = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")
    flags = ("--harmful", "--harmless", "--harmful-val", "--harmless-val")
    cmd = [sys.executable, "-m", "cosmic_bake.cli", "select", model, "-o", str(run)]
    cmd += [x for flag, name in zip(flags, files) for x in (flag, str(ref / f"{name}.json"))]
    cmd += ["--chat-template", TEMPLATE, "--batch-size", "32"]
    cmd += ["--all-scores"] if all_scores else []
    cmd += ["--dtype", dtype] if dtype else []
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    # RUSAGE_CHILDREN is the largest child so far: with several runs, the largest of them.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return json.loads((run / "selection.json").read_text()), wall, peak_kib / 2**20


PAIRS = {"s_comply": "refusal_score", "s_refuse": "steering_score", "kl": "kl_div_score"}


def compare(sel: dict, ref: Path) -> dict:
    """Evaluation layers, choice and computed scores of ``sel`` against the official code's."""
    expected = {(r["position"], r["layer"]): r for r in json.loads((ref / "scores.json").read_text())}
    ranked = json.loads((ref / "eval_layers_ranked.json").read_text())["ranked_layers"]
    worst = dict.fromkeys(PAIRS, 0.0)
    computed = dict.fromkeys(PAIRS, 0)
    for row in sel["candidates"]:
        want = expected[(row["position"], row["layer"])]
        for ours, theirs in PAIRS.items():
            if row[ours] is not None:  # a KL select did not need
                worst[ours] = max(worst[ours], abs(row[ours] - want[theirs]))
                computed[ours] += 1
    n_low = len(sel["eval_layers"])
    return {
        "eval_layers": sel["eval_layers"],
        "eval_layers_match": sel["eval_layers"] == ranked[:n_low],
        "chosen": sel["chosen"],
        "chosen_match": (sel["chosen"]["position"], sel["chosen"]["layer"]) == (-2, 15),
        "max_abs_diff": worst,
        "scores_compared": computed,
        "within_1e-3": all(v <= 1e-3 for v in worst.values()),
        "seconds_after_load": sel["timings"]["total"],
        "timings": sel["timings"],
        "reference_seconds_after_load": REFERENCE_SECONDS,
        "speedup_vs_reference": REFERENCE_SECONDS / sel["timings"]["total"],
    }


def between(a: dict, b: dict) -> dict:
    """What changes from selection ``a`` to ``b``: choice, evaluation layers, largest score differences."""
    rows_a = {(r["position"], r["layer"]): r for r in a["candidates"]}
    diff = dict.fromkeys(PAIRS, 0.0)
    where = dict.fromkeys(PAIRS)
    for row in b["candidates"]:
        other = rows_a[(row["position"], row["layer"])]
        for name in PAIRS:
            if row[name] is not None and other[name] is not None and abs(row[name] - other[name]) >= diff[name]:
                diff[name] = abs(row[name] - other[name])
                where[name] = [row["position"], row["layer"]]
    pick = ("position", "layer")
    return {
        "same_choice": [a["chosen"][k] for k in pick] == [b["chosen"][k] for k in pick],
        "same_eval_layers": a["eval_layers"] == b["eval_layers"],
        "max_abs_score_diff": diff,
        "at": where,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--all-scores", action="store_true", help="compute (and compare) every candidate's KL")
    ap.add_argument(
        "--dtype",
        action="append",
        choices=("float32", "bfloat16", "float16"),
        help="load the model in this dtype (default: select's auto, float32 on the CPU); "
        "give it twice (float32 then bfloat16) to run both and compare them",
    )
    args = ap.parse_args()
    result: dict = {"runs": {}}
    sels = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtype or [None]:
            sel, wall, peak = run_select(args.reference, args.model, args.all_scores, dtype, Path(tmp))
            sels[dtype or "auto"] = sel
            result["runs"][dtype or "auto"] = {**compare(sel, args.reference), "wall_seconds_total": wall}
            result["peak_rss_gib_largest_run"] = peak
    names = list(sels)
    for other in names[1:]:
        result[f"{names[0]}_vs_{other}"] = between(sels[names[0]], sels[other])
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
