"""The baked model's card (``README.md``): Hub front matter and a plain account of the edit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from cosmic_bake import __version__

if TYPE_CHECKING:
    from cosmic_bake.artifacts import Direction
    from cosmic_bake.bake.folder import BakeReport
    from cosmic_bake.bake.plan import BakePlan

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(source, config: dict, direction: Direction) -> str | None:
    """A Hub id for the card's ``base_model``, when one is known."""
    for candidate in (getattr(source, "hub_id", None), direction.model_id, config.get("_name_or_path")):
        if candidate and _HUB_ID.match(str(candidate)) and not Path(str(candidate)).exists():
            return str(candidate)
    return None


def _describe(report: BakeReport) -> tuple[str, str]:
    """(title suffix, paragraph) for the baked mode."""
    if report.mode == "add":
        return (
            f"steered along its refusal direction (alpha {report.alpha:g})",
            f"A refusal direction found with COSMIC, times alpha = {report.alpha:g}, is added to the residual "
            f"stream at the input of layer {report.layer} (activation addition), stored in the weights: "
            f"{report.constant}. This is the weight form of the `add` runtime hook.",
        )
    if report.mode == "scale":
        return (
            f"with its refusal component scaled around the harmful/harmless midpoint (beta {report.alpha:g})",
            "Every module that writes into the residual stream was scaled by 1 + beta along a refusal direction "
            f"found with COSMIC, and the embedding moved so that the stream's component p along it becomes "
            f"p + beta (p - m), m the midpoint of the harmful and harmless means at layer {report.layer} "
            f"(beta = {report.alpha:g}): {report.constant}. Prompts on the harmful side are pushed toward "
            "refusal, prompts on the harmless side away from it. This is the weight form of the `scale` hook.",
        )
    if report.mode == "affine":
        return (
            f"with its refusal component pinned (affine edit, alpha {report.alpha:g})",
            "Every module that writes into the residual stream was orthogonalised against a refusal direction "
            f"found with COSMIC, and a constant sets the stream's component along it from layer {report.layer} on "
            f"(the harmless mean's component plus alpha = {report.alpha:g} times the direction): "
            f"{report.constant}. This is the weight form of the `pin` runtime hook (affine concept editing).",
        )
    return (
        "with the refusal direction removed",
        "Every module that writes into the residual stream was orthogonalised against a refusal "
        "direction found with COSMIC, so the stream never carries that direction. This is the "
        "weight form of removing the direction at every layer with a runtime hook.",
    )


def model_card(report: BakeReport, plan: BakePlan, source_name: str, base_model: str | None) -> str:
    """README.md with Hub front matter and a plain account of the edit."""
    front = ["---"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front += ["library_name: transformers", "tags:", "- cosmic-bake", "- refusal-direction", "- abliterated", "---"]
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report.edits.items()) if k != "copy")
    post = sorted(plan.gains)
    if plan.embeddings == "skip":
        emb = "left unchanged (`--embeddings skip`)"
    elif report.tied:
        emb = (
            f"rows projected ({', '.join(report.embeddings_edited)}); the embedding was tied to the output "
            "head, so the head was untied and keeps the original embedding (`tie_word_embeddings: false`)"
        )
    else:
        emb = f"rows projected ({', '.join(report.embeddings_edited)})"
    title, what = _describe(report)
    body = [
        f"# {Path(source_name).name} {title}",
        "",
        f"Made with cosmic-bake {__version__} from `{source_name}`"
        + (f" (base model `{base_model}`)." if base_model else "."),
        "",
        what,
        "",
        "| | |",
        "| --- | --- |",
        f"| direction SHA-256 (float64) | `{report.direction_digest}` |",
        f"| chosen layer / position | {report.layer} / {report.position} |",
        f"| mode / selector | {report.mode} / {report.selector} |",
        *([f"| alpha / constant | {report.alpha:g} / {report.constant} |"] if report.mode != "ablate" else []),
        f"| model | {report.model_type}, {report.n_layers} layers, hidden size {report.d_model} |",
        f"| residual writers edited | {len(report.writers)} modules |",
        f"| tensors edited | {counts} |",
        f"| embeddings | {emb} |",
        *([f"| post-writer norms | {len(post)} (their writers use unit(g * r)) |"] if post else []),
        "",
        "Edits: `W <- (I - r r^T) W` for attention output and MLP down projections (every expert's "
        "too), `b <- b - (b . r) r` for their biases, `E <- E (I - r r^T)` for embedding rows, "
        "computed in float64 and cast back to the source dtype. Where a norm follows a writer, `r` "
        "is replaced by `unit(g * r)` with the norm's gain `g`.",
        "",
        "The model loads with stock transformers (no remote code). Check it against the original "
        "with `cosmic-bake verify ORIGINAL THIS_FOLDER --direction RUN_DIR`. File hashes and "
        "settings are in `manifest.json`.",
    ]
    if report.warnings:
        body += ["", "**Warnings:**", *[f"- {w}" for w in report.warnings]]
    return "\n".join([*front, "", *body]) + "\n"


def results_section(rows: list[dict]) -> str:
    """A card section with what verify and eval measured (rows as ``run``'s summary holds them)."""
    lines = [
        "## Verification and evaluation",
        "",
        "`verify` compares each export with the original model plus the runtime hook this edit equals "
        "(next-token logits at every prompt position). `eval` counts refusals by substring (greedy "
        "generation) and measures the first-token KL on harmless prompts against the original.",
        "",
        "| output | verify | mean KL | max KL | top-1 | harmful refusal | harmless refusal | harmless KL |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def num(d: dict, k: str, fmt: str) -> str:
        return "—" if d.get(k) is None else format(d[k], fmt)

    for row in rows:
        v, e = row.get("verify") or {}, row.get("eval") or {}
        rates = [
            "—" if e.get(f"{w}_refusal_rate") is None else f"{e[f'{w}_refusal_rate']:.1%} of {e[f'n_{w}']}"
            for w in ("harmful", "harmless")
        ]
        lines.append(
            f"| {row['export']} | {('PASS' if v.get('passed') else 'FAIL') if v else '—'} | "
            f"{num(v, 'mean_kl', '.2e')} | {num(v, 'max_kl', '.2e')} | {num(v, 'top1_agreement', '.3f')} | "
            f"{rates[0]} | {rates[1]} | {num(e, 'harmless_kl', '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def card_with_results(card: str, rows: list[dict]) -> str:
    """``card`` with the results section appended (replacing an earlier one)."""
    head = card.split("\n## Verification and evaluation\n", 1)[0].rstrip("\n")
    return head + "\n\n" + results_section(rows)


def lora_card(base_model: str, direction: Direction, n_modules: int, with_gguf: bool) -> str:
    """README.md for a LoRA export: what the adapter does and how to apply it in each runtime."""
    hub = base_model if _HUB_ID.match(base_model) and not Path(base_model).exists() else None
    front = [
        "---",
        *([f"base_model: {hub}"] if hub else []),
        "library_name: peft",
        "tags:",
        "- cosmic-bake",
        "- refusal-direction",
        "- lora",
        "---",
    ]
    body = [
        f"# Refusal-direction removal for `{base_model}` as a LoRA adapter",
        "",
        f"Made with cosmic-bake {__version__}. Every residual writer (attention output and MLP down "
        "projection) and the token embedding get a rank-1 update `W + B A` with `B = -r` and "
        "`A = r^T W` (alpha = rank = 1), which removes a refusal direction `r` found with COSMIC "
        f"(layer {direction.layer}, position {direction.position}, direction SHA-256 "
        f"`{direction.digest[:16]}`): {n_modules} modules.",
        "",
        "transformers: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_FOLDER)`, "
        "with peft >= 0.18 (older releases leave the embedding update unscaled on Gemma models).",
    ]
    if with_gguf:
        body.append("llama.cpp: `llama-cli -m BASE.gguf --lora adapter.gguf` (the base may be quantized).")
    body += ["", "Check it: `cosmic-bake verify BASE THIS_FOLDER --direction RUN_DIR`. Hashes in `manifest.json`."]
    return "\n".join([*front, "", *body]) + "\n"
