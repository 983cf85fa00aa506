"""Does verify tell a baked GGUF from an unedited one, at every output type, on the builtin models?

For each builtin model: the unedited source GGUF given as the baked file, then each export
(source types, ``--edited-type-always``, q8_0, q4_k_m, f16), each verified in llama.cpp against
the hook. Prints, per file: KL(hook || baked), KL(hook || unedited of the same type), their ratio
(the relative gate: at most ``RATIO_MAX``), top-1 agreement, the weight-space check and PASS/FAIL;
writes the table as JSON and draws the ratios as a PNG.

Directions: Qwen uses the official COSMIC code's choice (``../shared/reference``: position -2,
layer 15, the case the issue measured); SmolLM2 the difference in means of the residual entering
layer 8 at the last token over 32 + 32 built-in prompts (``--select`` runs COSMIC instead: minutes).

    python benchmarks/verify_gates.py [--models smollm2,qwen] [--limit 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cosmic_bake import api
from cosmic_bake.artifacts import Direction
from cosmic_bake.verify.logits import RATIO_MAX

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "cosmic-qwen2.5-coder-0.5b-lce"
MODELS = {"smollm2": "builtin:smollm2-135m-instruct", "qwen": "builtin:qwen2.5-coder-0.5b-instruct"}
# (label, bake options); None: the unedited source itself is given as the baked file
EXPORTS: list[tuple[str, dict | None]] = [
    ("unedited source", None),
    ("source types", {}),
    ("--edited-type-always", {"edited_type_always": True}),
    ("q8_0", {"outtype": "q8_0"}),
    ("q4_k_m", {"outtype": "q4_k_m"}),
    ("f16", {"outtype": "f16"}),
]


def source_hash(model: str) -> str:
    """The hash bake checks a direction against (the model it was selected on)."""
    from cosmic_bake.artifacts import model_hash, source_record
    from cosmic_bake.model.loading import resolve

    return model_hash(source_record(resolve(model)))


def reference_run(model: str, out: Path) -> Path:
    """A run folder holding the official code's chosen Qwen direction (no selection needed)."""
    from safetensors import safe_open

    with safe_open(str(REFERENCE / "candidates.safetensors"), "pt") as fh:
        meta = fh.metadata()
        direction = fh.get_tensor("direction").double()
        position, layer = int(meta["chosen_position"]), int(meta["chosen_layer"])
    out.mkdir(parents=True, exist_ok=True)
    Direction(
        direction=direction,
        reference=torch.zeros_like(direction),  # the harmless mean: not recorded there, unused by removal
        layer=layer,
        position=position,
        mode="ablate",
        selector="cosmic (official code, reference case)",
        alpha=1.0,
        model_id=model,
        model_hash=source_hash(model),
    ).save(out)
    return out


def mean_difference_run(model: str, out: Path, layer: int = 8, n: int = 32) -> Path:
    """A run folder with the harmful-minus-harmless mean residual at ``layer``'s input, last token."""
    from cosmic_bake.prompts.sets import load_prompts

    lm, _, fmt = api.load(model)
    means = []
    with torch.no_grad():
        for name in ("builtin:harmful", "builtin:harmless"):
            batch = fmt.encode(load_prompts(name, limit=n))
            hidden = lm.model(**batch, use_cache=False, output_hidden_states=True).hidden_states[layer]
            means.append(hidden[:, -1].double().mean(0))
    out.mkdir(parents=True, exist_ok=True)
    Direction(
        direction=means[0] - means[1],
        reference=means[1],
        layer=layer,
        position=-1,
        mode="ablate",
        selector="difference in means (benchmark)",
        alpha=1.0,
        model_id=model,
        model_hash=source_hash(model),
    ).save(out)
    return out


def weight_figures(model: str, baked: Path, run: Path) -> dict | None:
    """The prompt-free weight-space check, when this build has it."""
    try:
        from cosmic_bake.verify.weights import weight_check
    except ImportError:
        return None
    return weight_check(model, baked, Direction.load(run)).to_dict()


def measure(name: str, model: str, run: Path, work: Path, limit: int) -> list[dict]:
    from cosmic_bake.model.loading import resolve

    rows = []
    for label, options in EXPORTS:
        t0 = time.perf_counter()
        if options is None:
            target = resolve(model).path
        else:
            target = work / f"{name}-{label.strip('-').replace('_', '-').replace(' ', '-')}.gguf"
            if not target.exists():
                api.bake(model, run, target, format="gguf", **options)
        bake_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = api.verify(model, target, run, limit=limit)
        verify_s = time.perf_counter() - t0
        weights = weight_figures(model, target, run)
        row = {
            "model": name,
            "file": label,
            "size_mib": target.stat().st_size / 2**20,
            "weight_type": report.weight_type,
            "kl_baked": report.mean_kl,
            "kl_unedited": report.unedited_mean_kl,
            "ratio": report.ratio,
            "top1": report.top1_agreement,
            "kl_tolerance": report.kl_tolerance,
            "floor": (report.runtime_floor or {}).get("mean_kl"),
            "unedited_reference": report.unedited_reference,
            "weights": weights,
            "passed": report.passed,
            "reasons": report.reasons,
            "bake_s": bake_s,
            "verify_s": verify_s,
        }
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    w = r["weights"]
    wtxt = "-"
    if w is not None:
        worst = max(float("inf") if c["max_residual"] is None else c["max_residual"] for c in w["classes"])
        wtxt = ("PASS" if w["passed"] else "FAIL") + f" (max residual {worst:.3f})"
    return (
        f"{r['model']:8} {r['file']:22} {r['weight_type']:6} {r['size_mib']:7.1f} MiB  "
        f"KL {r['kl_baked']:.3e}  unedited {r['kl_unedited']:.3e}  ratio {r['ratio']:.3f}  "
        f"top-1 {r['top1']:.3f}  weights {wtxt}  {'PASS' if r['passed'] else 'FAIL'}  "
        f"({r['bake_s']:.0f} s bake, {r['verify_s']:.0f} s verify)"
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == m]
        colors = ["tab:green" if r["passed"] else "tab:red" for r in sub]
        ax.bar([r["file"] for r in sub], [r["ratio"] for r in sub], color=colors)
        ax.axhline(RATIO_MAX, color="black", linestyle="--", label=f"gate {RATIO_MAX:g}")
        ax.set_yscale("log")
        ax.set_ylabel("KL(hook||baked) / KL(hook||unedited)")
        ax.set_title(f"{m}: green PASS, red FAIL")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,qwen")
    ap.add_argument("--limit", type=int, default=8, help="verify prompts per built-in set")
    ap.add_argument("--out", type=Path, default=Path("runs/verify-gates"))
    ap.add_argument("--select", action="store_true", help="choose SmolLM2's direction with COSMIC (slow)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    rows = []
    for name in args.models.split(","):
        model = MODELS[name]
        run = args.out / f"{name}-run"
        if not (run / "direction.safetensors").is_file():
            if name == "qwen":
                reference_run(model, run)
            elif args.select:
                api.select(model, run, limit=32, limit_val=4)
            else:
                mean_difference_run(model, run)
        rows += measure(name, model, run, args.out, args.limit)
    (args.out / "verify_gates.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.out / "verify_gates.png")
    print(f"written {args.out / 'verify_gates.json'} and verify_gates.png")


if __name__ == "__main__":
    main()
