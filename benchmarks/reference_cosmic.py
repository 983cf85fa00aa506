"""Faithfulness and speed against the official COSMIC code (``../shared/reference``).

Runs ``cosmic-bake select`` on exactly the reference's prompts and chat format, then compares the
evaluation layers, every candidate's S_comply / S_refuse / KL and the choice with what the paper's
code computed, and reports wall time and peak memory against the reference's 1235 s.

    python benchmarks/reference_cosmic.py [--reference DIR] [--out results.json] [--all-scores]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--all-scores", action="store_true", help="compute (and compare) every candidate's KL")
    args = ap.parse_args()
    ref = args.reference
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "cosmic_bake.cli",
            "select",
            args.model,
            "-o",
            str(run),
            "--harmful",
            str(ref / "harmful_train.json"),
            "--harmless",
            str(ref / "harmless_train.json"),
            "--harmful-val",
            str(ref / "harmful_val.json"),
            "--harmless-val",
            str(ref / "harmless_val.json"),
            "--chat-template",
            TEMPLATE,
            "--batch-size",
            "32",
            *(["--all-scores"] if args.all_scores else []),
        ]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        sel = json.loads((run / "selection.json").read_text())
    expected = {(r["position"], r["layer"]): r for r in json.loads((ref / "scores.json").read_text())}
    ranked = json.loads((ref / "eval_layers_ranked.json").read_text())["ranked_layers"]
    worst = {"s_comply": 0.0, "s_refuse": 0.0, "kl": 0.0}
    pairs = {"s_comply": "refusal_score", "s_refuse": "steering_score", "kl": "kl_div_score"}
    computed = {name: 0 for name in pairs}
    for row in sel["candidates"]:
        want = expected[(row["position"], row["layer"])]
        for ours, theirs in pairs.items():
            if row[ours] is not None:  # a KL select did not need
                worst[ours] = max(worst[ours], abs(row[ours] - want[theirs]))
                computed[ours] += 1
    n_low = len(sel["eval_layers"])
    result = {
        "eval_layers": sel["eval_layers"],
        "eval_layers_match": sel["eval_layers"] == ranked[:n_low],
        "chosen": sel["chosen"],
        "chosen_match": (sel["chosen"]["position"], sel["chosen"]["layer"]) == (-2, 15),
        "max_abs_diff": worst,
        "scores_compared": computed,
        "within_1e-3": all(v <= 1e-3 for v in worst.values()),
        "wall_seconds_total": wall,
        "seconds_after_load": sel["timings"]["total"],
        "timings": sel["timings"],
        "reference_seconds_after_load": REFERENCE_SECONDS,
        "speedup_vs_reference": REFERENCE_SECONDS / sel["timings"]["total"],
        "peak_rss_gib": peak_kib / 2**20,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
