"""The baked model's card (``README.md``): Hub front matter and a plain account of the edit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from cosmic_bake import __version__

if TYPE_CHECKING:
    from cosmic_bake.artifacts import Direction
    from cosmic_bake.bake import BakePlan, BakeReport

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
