"""Benchmark baking: time against a plain copy of the same weight files, and peak memory.

    python benchmarks/bench_bake.py [MODEL] [--direction RUN_DIR] [--out bench.json]

MODEL is a folder, a .gguf or a builtin name (default builtin:qwen2.5-coder-0.5b-instruct, baked
from its dequantized float32 cache). Without --direction a seeded random direction is used.

Time: the bake (plan, edit + write, copy side files + card + manifest hashes) against
``shutil.copy`` of each safetensors file, both in this run, reported as a ratio. The copy is
timed before and after the bake and the faster one is used, so neither gets a colder page cache.
Memory: the bake runs in a child process; its peak resident set is read with
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` and compared with the largest shard. Streaming edits
one tensor at a time and copies untouched ones byte for byte, so the peak should stay below one
shard plus the interpreter, torch and transformers (the child's resident set before baking is
reported as the baseline).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cosmic_bake.artifacts import Direction
from cosmic_bake.export.safetensors_read import list_weights
from cosmic_bake.model.loading import source_folder

DEFAULT_MODEL = "builtin:qwen2.5-coder-0.5b-instruct"

# Runs in the child: bake, then print timings and the resident set before baking.
_CHILD = """
import json, resource, sys, time
from cosmic_bake.bake.folder import bake_folder
folder, run_dir, out = sys.argv[1:4]
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
report = bake_folder(folder, run_dir, out, allow_mismatch=True)
print(json.dumps({"seconds": time.perf_counter() - t, "timings": report.timings, "baseline_kb": baseline,
                  "edits": report.edits, "files": report.files}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--direction", type=Path, default=None, help="RUN_DIR from select (default: random).")
    p.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    p.add_argument("--workdir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the bake (default: torch's).")
    return p.parse_args(argv)


def random_run_dir(folder: Path, run_dir: Path) -> Path:
    """A seeded random direction of the model's hidden size, saved as a run folder."""
    config = json.loads((folder / "config.json").read_text())
    d = int(config.get("hidden_size") or config["text_config"]["hidden_size"])
    g = torch.Generator().manual_seed(0)
    r = torch.randn(d, generator=g, dtype=torch.float64)
    run_dir.mkdir(parents=True, exist_ok=True)
    Direction(r, torch.zeros(d, dtype=torch.float64), layer=0, position=-1, model_id="random").save(run_dir)
    return run_dir


def time_copy(files: list[Path], dest: Path) -> float:
    """Seconds to ``shutil.copy`` every file into ``dest`` (removed afterwards)."""
    dest.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for f in files:
        shutil.copy(f, dest / f.name)
    seconds = time.perf_counter() - t
    shutil.rmtree(dest)
    return seconds


def bake_in_child(folder: Path, run_dir: Path, out: Path, threads: int | None) -> dict:
    """Run the bake in a fresh interpreter; return its report plus the children's peak RSS."""
    code = _CHILD if threads is None else f"import torch; torch.set_num_threads({threads})\n" + _CHILD
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(run_dir), str(out)], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"bake failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


def summarize(model: str, folder: Path, shards: list[Path], copies: list[float], child: dict) -> dict:
    largest = max(f.stat().st_size for f in shards)
    copy_s = min(copies)
    timings = child["timings"]
    baseline = child["baseline_kb"] * 1024
    return {
        "model": model,
        "folder": str(folder),
        "weight_bytes": sum(f.stat().st_size for f in shards),
        "shards": len(shards),
        "largest_shard_bytes": largest,
        "copy_seconds": copy_s,
        "copy_seconds_runs": copies,
        "bake_seconds": child["seconds"],
        "bake_timings": timings,
        "ratio_bake_to_copy": child["seconds"] / copy_s,
        "ratio_write_to_copy": timings["write"] / copy_s,
        "peak_rss_bytes": child["peak_rss_bytes"],
        "baseline_rss_bytes": baseline,
        "peak_over_largest_shard": child["peak_rss_bytes"] / largest,
        "peak_minus_baseline_over_largest_shard": (child["peak_rss_bytes"] - baseline) / largest,
        "edits": child["edits"],
        "threads": torch.get_num_threads(),
    }


def print_table(res: dict) -> None:
    gib = 2**30
    t = res["bake_timings"]
    rows = [
        ("model", res["model"]),
        ("weights", f"{res['weight_bytes'] / gib:.2f} GiB in {res['shards']} shard(s)"),
        ("plain copy", f"{res['copy_seconds']:.2f} s"),
        (
            "bake",
            f"{res['bake_seconds']:.2f} s (plan {t['plan']:.2f}, edit+write {t['write']:.2f}, "
            f"card+manifest hashes {t['finish']:.2f})",
        ),
        ("bake / copy", f"{res['ratio_bake_to_copy']:.2f}x (edit+write only: {res['ratio_write_to_copy']:.2f}x)"),
        ("largest shard", f"{res['largest_shard_bytes'] / gib:.2f} GiB"),
        ("peak RSS (bake)", f"{res['peak_rss_bytes'] / gib:.2f} GiB = {res['peak_over_largest_shard']:.2f}x shard"),
        (
            "  minus baseline",
            f"{(res['peak_rss_bytes'] - res['baseline_rss_bytes']) / gib:.2f} GiB = "
            f"{res['peak_minus_baseline_over_largest_shard']:.2f}x shard (baseline "
            f"{res['baseline_rss_bytes'] / gib:.2f} GiB)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    _, folder = source_folder(args.model)
    shards = [folder / f for f in list_weights(folder).files]
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-bake-") as tmp:
        work = Path(tmp)
        run_dir = args.direction or random_run_dir(folder, work / "run")
        copies = [time_copy(shards, work / "copy")]
        child = bake_in_child(folder, run_dir, work / "baked", args.threads)
        shutil.rmtree(work / "baked")
        copies.append(time_copy(shards, work / "copy"))
    res = summarize(args.model, folder, shards, copies, child)
    print_table(res)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
