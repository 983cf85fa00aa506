"""Compare two directions (two run folders): where they sit, how aligned they are, what they do.

    python examples/compare_directions.py MODEL RUN_A RUN_B [--prompts N]

Prints the cosine between the directions and, for each, the refusal rates and harmless KL under
removal on N built-in prompts of each kind (greedy, short completions).
"""

import argparse

import torch

from cosmic_bake import api
from cosmic_bake.artifacts import Direction
from cosmic_bake.prompts.sets import load_prompts
from cosmic_bake.verify.evaluate import evaluate

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("run_a")
parser.add_argument("run_b")
parser.add_argument("--prompts", type=int, default=4)
parser.add_argument("--max-new-tokens", type=int, default=24)
args = parser.parse_args()

a, b = Direction.load(args.run_a), Direction.load(args.run_b)
cos = float(torch.nn.functional.cosine_similarity(a.direction, b.direction, dim=0))
print(
    f"A: layer {a.layer}, position {a.position}, {a.selector}; B: layer {b.layer}, position {b.position}, {b.selector}"
)
print(f"cosine(A, B) = {cos:.4f}")

lm, arch, fmt = api.load(args.model)
harmful = load_prompts("builtin:harmful", limit=args.prompts)
harmless = load_prompts("builtin:harmless", limit=args.prompts)
for name, d in (("A", a), ("B", b)):
    rep = evaluate(
        lm.model,
        arch,
        fmt,
        harmful=harmful,
        harmless=harmless,
        intervention=d.with_mode("ablate", None).hook(),
        max_new_tokens=args.max_new_tokens,
    )
    print(
        f"{name}: harmful refusal {rep.harmful_refusal_rate:.2f}, harmless refusal {rep.harmless_refusal_rate:.2f}, "
        f"harmless KL {rep.harmless_kl:.4f}"
    )
