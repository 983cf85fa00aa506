"""Benchmark accelerate's disk offload against the in-memory run: same answers, seconds and peak RSS both ways.

    python benchmarks/bench_offload.py [MODEL] [--max-memory cpu=1GiB] [--limit 8] [--limit-val 4] [--out FILE]

MODEL defaults to builtin:qwen2.5-coder-0.5b-instruct (its dequantized float32 cache, 1.9 GB).
Each way runs in a child process, so its peak resident set (``ru_maxrss``) is its own:

* ``memory``: the model loaded as usual (the whole float32 model in RAM);
* ``offload``: ``Placement(device_map="auto", max_memory=..., offload_folder=...)``: accelerate keeps
  what fits the CPU budget in RAM and the remaining layers on disk (read back for each pass).

Both run select (``--limit`` / ``--limit-val`` prompts), eval with the removal hook (greedy, a few
tokens) and verify's logit comparison against a folder the in-memory child bakes from its run.
Peak RSS is given after select + eval, and after verify (which holds the original and the baked model). The
report gives seconds per stage, peak RSS, where accelerate put the modules, and the differences:
same choice, largest score difference, same completions, verify figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = "builtin:qwen2.5-coder-0.5b-instruct"

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from cosmic_bake import api
from cosmic_bake.model.devices import Placement
from cosmic_bake.model.session import Session
from cosmic_bake.model.hooks import Intervention
from cosmic_bake.artifacts import Direction
from cosmic_bake.prompts.sets import load_prompts
from cosmic_bake.verify.evaluate import evaluate

model, work, way, max_memory, limit, limit_val, tokens = sys.argv[1:8]
work = Path(work)
placement = None
if way == "offload":
    placement = Placement(device_map="auto", max_memory=max_memory, offload_folder=str(work / "offload"))
row, t = {}, time.perf_counter()
session = Session(pin=[model])
loaded = session.load(model, placement=placement)
row["load_s"] = time.perf_counter() - t
placed = loaded[0].extra.get("device_map", {})
where = [str(v) for v in placed.values()]
row["placed"] = {w: where.count(w) for w in sorted(set(where))}  # modules per place
t = time.perf_counter()
api.select(model, work / f"run_{way}", session=session, placement=placement, limit=int(limit), limit_val=int(limit_val))
row["select_s"] = time.perf_counter() - t
lm, arch, fmt = loaded
d = Direction.load(work / "run_memory")  # the same hook both ways
bad = load_prompts("builtin:harmful")[:4]
good = load_prompts("builtin:harmless")[:4]
t = time.perf_counter()
ev = evaluate(lm.model, arch, fmt, harmful=bad, harmless=good, intervention=Intervention.remove(d.direction),
              max_new_tokens=int(tokens), batch_size=4)
row["eval_s"] = time.perf_counter() - t
row["eval"] = {"completions": ev.completions, "harmless_kl": ev.harmless_kl}
row["peak_rss_select_eval_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
del loaded, lm, arch
session.close()
if way == "memory":
    t = time.perf_counter()
    api.bake(model, work / "run_memory", work / "baked")
    row["bake_s"] = time.perf_counter() - t
t = time.perf_counter()
rep = api.verify(model, work / "baked", work / "run_memory", limit=4, placement=placement)
row["verify_s"] = time.perf_counter() - t
row["verify"] = {k: getattr(rep, k) for k in ("passed", "max_abs_logit_diff", "mean_kl", "max_kl", "unedited_mean_kl")}
row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT " + json.dumps(row))
"""


def _child(model: str, work: Path, way: str, args) -> dict:
    cmd = [sys.executable, "-c", _CHILD, model, str(work), way, args.max_memory]
    cmd += [str(args.limit), str(args.limit_val), str(args.tokens)]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{way} run failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    row = json.loads(line[len("RESULT ") :])
    row["wall_s"] = time.perf_counter() - t
    print(f"[{way}] " + json.dumps({k: v for k, v in row.items() if k != "eval"}), flush=True)
    return row


def _selection(run: Path) -> tuple[dict, list[dict]]:
    record = json.loads((run / "selection.json").read_text())
    return record["chosen"], record["candidates"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--max-memory", default="cpu=1GiB", help="CPU budget of the offloaded run")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--limit-val", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per eval completion")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_offload-") as tmp:
        work = Path(tmp)
        rows = {"memory": _child(args.model, work, "memory", args)}  # also bakes the folder both verify
        rows["offload"] = _child(args.model, work, "offload", args)
        chosen_a, cands_a = _selection(work / "run_memory")
        chosen_b, cands_b = _selection(work / "run_offload")
    both = [(a[k], b[k]) for a, b in zip(cands_a, cands_b) for k in ("s_comply", "s_refuse", "kl")]
    # scores both computed (a KL select did not need is null), NaN aside
    worst = max((abs(x - y) for x, y in both if x is not None and y is not None and x == x), default=0.0)
    uncomputed = sum(x is None for x, _ in both)
    same_nulls = all((x is None) == (y is None) for x, y in both)
    va, vb = rows["memory"]["verify"], rows["offload"]["verify"]
    report = {
        "model": args.model,
        "max_memory": args.max_memory,
        "prompts": {"limit": args.limit, "limit_val": args.limit_val, "eval": 8, "verify": 4},
        "same_choice": chosen_a == chosen_b,
        "chosen": chosen_a,
        "max_score_diff": worst,
        "scores_not_computed": uncomputed,
        "same_scores_computed": same_nulls,
        "same_completions": rows["memory"]["eval"]["completions"] == rows["offload"]["eval"]["completions"],
        "harmless_kl_diff": abs(rows["memory"]["eval"]["harmless_kl"] - rows["offload"]["eval"]["harmless_kl"]),
        "verify_diff": {k: abs(va[k] - vb[k]) for k in va if k != "passed"},
        "verify_passed": [va["passed"], vb["passed"]],
        "runs": {way: {k: v for k, v in row.items() if k != "eval"} for way, row in rows.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
