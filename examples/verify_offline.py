"""Prove an edited model equals the original plus the runtime hook, offline (no Hub, no network).

    python examples/verify_offline.py ORIGINAL BAKED RUN_DIR [--limit N]

BAKED is a folder from ``bake`` or a ``.gguf`` file (run in llama.cpp). Exits 1 if it fails.
"""

import argparse
import sys

from cosmic_bake import api

parser = argparse.ArgumentParser()
parser.add_argument("original")
parser.add_argument("baked")
parser.add_argument("run_dir")
parser.add_argument("--limit", type=int, default=4, help="prompts per built-in set (harmless, harmful)")
args = parser.parse_args()

report = api.verify(args.original, args.baked, args.run_dir, limit=args.limit)
print(f"{args.baked}: {report.runtime}, {report.n_positions} positions")
print(f"  mean KL {report.mean_kl:.3e}, max KL {report.max_kl:.3e}, top-1 {report.top1_agreement:.4f}")
print(f"  {'PASS' if report.passed else 'FAIL'} (tolerance {report.gate} <= {report.kl_tolerance:.2g})")
sys.exit(0 if report.passed else 1)
