"""Benchmark the memory (and disk) bounds of select and bake, each step in a fresh child process.

    python benchmarks/bench_memory.py [MODEL] [--steps select,bake-hf,bake-gguf] [--limit 8] [--limit-val 4]
                                      [--outtype q8_0] [--out bench.json]

MODEL defaults to builtin:qwen2.5-coder-0.5b-instruct, whose dequantized float32 cache is the
model every step reads (its size is "the model" below). Each step reports seconds, peak
resident set (VmHWM) and, for bakes, the disk high-water mark of the output folder (every
temporary file of the bake lives there), against the bound it is designed for:

* ``select`` (``api.select``, float32, ``--limit`` / ``--limit-val`` prompts per set): peak at most
  the model x 1.25 plus the activations scoring keeps (``kept_activation_bytes`` in
  ``selection.json``: baseline outputs at the eval layers, last-position logits, and for replay one
  block's inputs plus the eval layers' outputs).
* ``bake-hf``: peak at most 0.4x the largest shard above the interpreter's baseline (streaming:
  one tensor at a time); disk: the output.
* ``bake-gguf`` (``--outtype``): no float32 intermediate for a 16-bit source; disk at most the
  output plus one shard (see :mod:`cosmic_bake.bake.gguf`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _measure import DiskWatch, gib, run_child, weight_bytes, write_json  # noqa: E402
from bench_bake import random_run_dir  # noqa: E402

DEFAULT_MODEL = "builtin:qwen2.5-coder-0.5b-instruct"
SELECT_BOUND = 1.25  # x the model, plus the kept activations
BAKE_HF_BOUND = 0.4  # x the largest shard, above the baseline

_SELECT = """
import json, sys, time
from cosmic_bake import api
import cosmic_bake.select.run_folder, transformers
model, out, limit, limit_val = sys.argv[1:5]
_RESULT["baseline_rss_bytes"] = _status("VmRSS")
t = time.perf_counter()
api.select(model, out, limit=int(limit), limit_val=int(limit_val))
_RESULT["seconds"] = time.perf_counter() - t
sel = json.load(open(out + "/selection.json"))
_RESULT["kept_activation_bytes"] = sel["kept_activation_bytes"]
_RESULT["chosen"] = sel["chosen"]
_RESULT["timings"] = sel["timings"]
"""

_BAKE = """
import json, sys, time
from cosmic_bake import api
import cosmic_bake.bake.folder, cosmic_bake.bake.gguf, transformers
model, run, out, fmt, outtype = sys.argv[1:6]
_RESULT["baseline_rss_bytes"] = _status("VmRSS")
t = time.perf_counter()
opts = {"format": "gguf", "outtype": outtype} if fmt == "gguf" else {}
api.bake(model, run, out, allow_mismatch=True, **opts)
_RESULT["seconds"] = time.perf_counter() - t
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--steps", default="select,bake-hf,bake-gguf")
    p.add_argument("--limit", type=int, default=8, help="training prompts per set (select)")
    p.add_argument("--limit-val", type=int, default=4, help="validation prompts per set (select)")
    p.add_argument("--outtype", default="q8_0", help="GGUF type of the bake-gguf step")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def step_select(model: str, work: Path, size: int, limit: int, limit_val: int) -> dict:
    res = run_child(_SELECT, model, str(work / "run"), str(limit), str(limit_val))
    kept = res["kept_activation_bytes"]
    res["bound_bytes"] = SELECT_BOUND * size + kept
    res["peak_over_model"] = res["peak_rss_bytes"] / size
    res["ok"] = res["peak_rss_bytes"] <= res["bound_bytes"]
    print(
        f"select      {res['seconds']:.1f} s; kept activations {kept / 2**20:.1f} MiB; peak RSS "
        f"{gib(res['peak_rss_bytes'])} = {res['peak_over_model']:.2f}x the model "
        f"(bound {SELECT_BOUND}x + kept = {gib(res['bound_bytes'])}: {'ok' if res['ok'] else 'OVER'})"
    )
    return res


def step_bake(model: str, work: Path, run: Path, fmt: str, outtype: str, largest_shard: int, size: int) -> dict:
    out_dir = work / f"bake-{fmt}"
    out_dir.mkdir()
    out = out_dir / ("model.gguf" if fmt == "gguf" else "model")
    with DiskWatch(out_dir) as disk:
        res = run_child(_BAKE, model, str(run), str(out), fmt, outtype)
    out_bytes = out.stat().st_size if fmt == "gguf" else weight_bytes(out)
    res.update(disk_peak_bytes=disk.peak, output_bytes=out_bytes, largest_shard_bytes=largest_shard)
    above = res["peak_rss_bytes"] - res["baseline_rss_bytes"]
    res["peak_above_baseline_over_shard"] = above / largest_shard
    res["disk_over_output"] = disk.peak / out_bytes
    if fmt == "hf":
        res["ok"] = above <= BAKE_HF_BOUND * largest_shard
        bound = f"bound {BAKE_HF_BOUND}x shard above baseline"
    else:
        res["ok"] = disk.peak <= out_bytes + largest_shard
        bound = f"disk bound output + one shard = {gib(out_bytes + largest_shard)}"
    print(
        f"bake {fmt:<6} {res['seconds']:.1f} s; peak RSS {gib(res['peak_rss_bytes'])} (baseline "
        f"{gib(res['baseline_rss_bytes'])}, above it {res['peak_above_baseline_over_shard']:.2f}x the largest shard "
        f"{gib(largest_shard)}); disk peak {gib(disk.peak)} for a {gib(out_bytes)} output; {bound}: "
        f"{'ok' if res['ok'] else 'OVER'}"
    )
    return res


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from cosmic_bake.export.safetensors_read import list_weights
    from cosmic_bake.model.loading import source_folder

    _, folder = source_folder(args.model)
    listing = list_weights(folder)
    size, largest = weight_bytes(folder), listing.largest_file_bytes()
    results: dict = {"model": args.model, "model_bytes": size, "largest_shard_bytes": largest}
    print(f"model       {args.model}: {gib(size)} of float32 weights, largest shard {gib(largest)}")
    steps = args.steps.split(",")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-memory-") as tmp:
        work = Path(tmp)
        run = random_run_dir(folder, work / "random-run")
        if "select" in steps:
            results["select"] = step_select(args.model, work, size, args.limit, args.limit_val)
        if "bake-hf" in steps:
            results["bake_hf"] = step_bake(args.model, work, run, "hf", "", largest, size)
        if "bake-gguf" in steps:
            results["bake_gguf"] = step_bake(args.model, work, run, "gguf", args.outtype, largest, size)
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    json.dumps(main())
