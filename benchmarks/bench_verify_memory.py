"""Benchmark verify's memory: peak resident set against the size of one model in the compared dtype.

    python benchmarks/bench_verify_memory.py [MODEL] [--limit N] [--dtype float32] [--out bench.json]

MODEL (default builtin:qwen2.5-coder-0.5b-instruct) is baked with a seeded random direction to a
transformers folder (``bake`` in a child process, the source's dtype: float32 for a builtin's
dequantized cache), then ``api.verify(MODEL, BAKED, RUN)`` runs in a fresh child whose peak
resident set (VmHWM) is compared with the baked model's weight bytes. The bound designed for:
peak at most 1.3x one model (verify holds one model at a time; the hooked logits wait on disk
while the baked model is loaded, see :mod:`cosmic_bake.verify.logits`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _measure import gib, run_child, weight_bytes, write_json  # noqa: E402
from bench_bake import random_run_dir  # noqa: E402

DEFAULT_MODEL = "builtin:qwen2.5-coder-0.5b-instruct"
BOUND = 1.3

_BAKE = """
import sys
from cosmic_bake import api
model, run, out, fmt = sys.argv[1:5]
opts = {"gguf": {"format": "gguf", "outtype": "q8_0"}, "lora": {"format": "lora"}}.get(fmt, {})
if fmt == "lora":
    api.export_lora(model, run, out, allow_mismatch=True)
else:
    api.bake(model, run, out, allow_mismatch=True, **opts)
"""

_VERIFY = """
import sys, time
import torch
from cosmic_bake import api
model, baked, run, limit, dtype = sys.argv[1:6]
import cosmic_bake.verify.logits, cosmic_bake.model.loading, transformers  # imports before the baseline
_RESULT["baseline_rss_bytes"] = _status("VmRSS")
t = time.perf_counter()
report = api.verify(model, baked, run, limit=int(limit), dtype=dtype)
_RESULT["seconds"] = time.perf_counter() - t
_RESULT["report"] = {k: getattr(report, k) for k in (
    "passed", "n_prompts", "n_positions", "max_abs_logit_diff", "mean_kl", "max_kl", "top1_agreement",
    "unedited_mean_kl", "ratio")}
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--limit", type=int, default=16, help="verify prompts per built-in set (default 16: 32 prompts)")
    p.add_argument("--dtype", default="float32", help="dtype verify loads both models in")
    p.add_argument("--format", default="hf", choices=("hf", "gguf", "lora"), help="what is baked and verified")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def measure(model: str, work: Path, limit: int, dtype: str, fmt: str = "hf") -> dict:
    """Bake ``model`` into ``work`` (``fmt``: hf, gguf q8_0, lora) and measure verify on it."""
    from cosmic_bake.model.loading import source_folder

    _, folder = source_folder(model)
    run = random_run_dir(folder, work / "run")
    baked = work / ("baked.gguf" if fmt == "gguf" else "baked")
    run_child(_BAKE, model, str(run), str(baked), fmt)
    res = run_child(_VERIFY, model, str(baked), str(run), str(limit), dtype)
    size = weight_bytes(baked) if fmt == "hf" else weight_bytes(folder)  # the largest model verify loads
    res.update(model=model, format=fmt, model_bytes=size, source_bytes=weight_bytes(folder), dtype=dtype, bound=BOUND)
    res["peak_over_model"] = res["peak_rss_bytes"] / size
    res["peak_minus_baseline_over_model"] = (res["peak_rss_bytes"] - res["baseline_rss_bytes"]) / size
    return res


def print_table(res: dict) -> None:
    r = res["report"]
    rows = [
        ("model", f"{res['model']} ({res['dtype']}), baked as {res['format']}"),
        ("model weights", gib(res["model_bytes"])),
        ("source weights", gib(res["source_bytes"])),
        ("verify", f"{res['seconds']:.1f} s, {r['n_prompts']} prompts, {r['n_positions']} positions"),
        ("report", f"passed {r['passed']}, max KL {r['max_kl']:.3g}, top-1 {r['top1_agreement']:.4f}"),
        ("baseline RSS (imports)", gib(res["baseline_rss_bytes"])),
        ("peak RSS", f"{gib(res['peak_rss_bytes'])} = {res['peak_over_model']:.2f}x the model (bound {BOUND}x)"),
        ("  minus baseline", f"{res['peak_minus_baseline_over_model']:.2f}x the model"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-verify-") as tmp:
        res = measure(args.model, Path(tmp), args.limit, args.dtype, args.format)
    print_table(res)
    write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
