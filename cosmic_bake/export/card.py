"""The baked model's card (``README.md``): Hub front matter and a plain account of the edit."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from cosmic_bake import __version__
from cosmic_bake.export.lineage import HUB_URL, RELATIONS, Lineage, edit_phrase

if TYPE_CHECKING:
    from cosmic_bake.artifacts import Direction
    from cosmic_bake.bake.folder import BakeReport
    from cosmic_bake.bake.plan import BakePlan

CARD_FILE = "README.md"
TAGS = ("cosmic-bake", "refusal-direction", "abliterated")


def _yaml_scalar(value: str) -> str:
    """A YAML scalar for ``value``: plain when it is a simple token, else JSON-quoted (valid YAML)."""
    return value if re.fullmatch(r"[A-Za-z0-9][\w./+-]*", value) else json.dumps(value)


def front_matter(lin: Lineage, output: str, library: str | None, tags: tuple[str, ...]) -> list[str]:
    """The Hub metadata block: base model and relation (see :mod:`~cosmic_bake.export.lineage`), license, tags."""
    lines = ["---"]
    if lin.base_model:
        lines += [f"base_model: {_yaml_scalar(lin.base_model)}", f"base_model_relation: {RELATIONS[output]}"]
    if lin.license:
        lines.append(f"license: {_yaml_scalar(lin.license)}")
    if library:
        lines.append(f"library_name: {library}")
    lines += ["pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags], "---"]
    return lines


def source_line(lin: Lineage) -> str:
    """ "Made with ... from ..." naming the source portably (Hub link when known, else its file name)."""
    text = f"Made with cosmic-bake {__version__} from `{lin.label}`"
    if lin.base_model and lin.base_model != lin.label:
        text += f" (base model [{lin.base_model}]({HUB_URL}{lin.base_model}))"
    elif lin.base_model:
        text = f"Made with cosmic-bake {__version__} from [{lin.base_model}]({HUB_URL}{lin.base_model})"
    return text + "."


def describe_edits(counts: dict[str, int], n_embeddings: int) -> str:
    """The tensors a bake changed, in words ("48 weight matrices and 1 embedding, of 290 tensors")."""
    matrices = sum(counts.get(k, 0) for k in ("rows", "expert_rows", "cols", "expert_cols")) - n_embeddings
    parts = [
        _count(matrices, "weight matrix", "weight matrices"),
        _count(counts.get("bias", 0), "bias", "biases"),
        _count(n_embeddings, "embedding", "embeddings"),
        _count(counts.get("zeros", 0), "new bias (holding the constant)", "new biases (holding the constant)"),
    ]
    parts = [p for p in parts if p]
    total = sum(counts.values())
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] if parts else "none"
    return f"{listed}, of {total} tensors (the others are copied unchanged)"


def _count(n: int, one: str, many: str) -> str:
    return "" if n <= 0 else f"{n} {one if n == 1 else many}"


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


def model_card(report: BakeReport, plan: BakePlan, lin: Lineage) -> str:
    """README.md with Hub front matter and a plain account of the edit (names only portable ones)."""
    front = front_matter(lin, "hf", "transformers", TAGS)
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
        f"# {lin.display} {title}",
        "",
        source_line(lin),
        "",
        what,
        "",
        "| | |",
        "| --- | --- |",
        f"| edit | {edit_phrase(report.mode, report.alpha)} (mode `{report.mode}`, selector `{report.selector}`) |",
        f"| chosen layer / position | {report.layer} / {report.position} |",
        f"| direction SHA-256 (float64) | `{report.direction_digest}` |",
        *([f"| alpha / constant | {report.alpha:g} / {report.constant} |"] if report.mode != "ablate" else []),
        f"| model | {report.model_type}, {report.n_layers} layers, hidden size {report.d_model} |",
        f"| residual writers edited | {len(report.writers)} modules |",
        f"| tensors changed | {describe_edits(report.edits, len(report.embeddings_edited))} |",
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


def gguf_card(manifest: dict, file_name: str) -> str:
    """README.md for a baked GGUF pushed on its own, from its sidecar manifest (written at bake time)."""
    lin = Lineage(**{k: v for k, v in (manifest.get("lineage") or {}).items() if k in Lineage.__dataclass_fields__})
    d, bake = manifest.get("direction") or {}, manifest.get("bake") or {}
    mode, alpha = str(d.get("mode", "ablate")), float(d.get("alpha") or 0.0)
    types = bake.get("outtype") or "the source's tensor types, edited tensors re-quantized"
    body = [
        f"# {lin.display} ({edit_phrase(mode, alpha)}), GGUF",
        "",
        source_line(lin),
        "",
        "| | |",
        "| --- | --- |",
        f"| file | `{file_name}` ({bake.get('route', 'gguf')}: {types}) |",
        f"| edit | {edit_phrase(mode, alpha)} (mode `{mode}`, selector `{d.get('selector', 'cosmic')}`) |",
        f"| chosen layer / position | {d.get('layer')} / {d.get('position')} |",
        f"| direction SHA-256 (float64) | `{d.get('sha256_float64', '')}` |",
        "",
        f"llama.cpp: `llama-cli -m {file_name}`. Check it against the original with "
        f"`cosmic-bake verify ORIGINAL {file_name} --direction RUN_DIR`. Hashes and settings are in "
        f"`{file_name}.manifest.json`.",
    ]
    warnings = bake.get("warnings") or []
    if warnings:
        body += ["", "**Warnings:**", *[f"- {w}" for w in warnings]]
    return "\n".join([*front_matter(lin, "gguf", None, (*TAGS, "gguf")), "", *body]) + "\n"


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


def lora_card(lin: Lineage, direction: Direction, n_modules: int, with_gguf: bool) -> str:
    """README.md for a LoRA export: what the adapter does and how to apply it in each runtime."""
    front = front_matter(lin, "lora", "peft", ("cosmic-bake", "refusal-direction", "lora"))
    base = lin.base_model or lin.label
    body = [
        f"# Refusal-direction removal for {lin.display} as a LoRA adapter",
        "",
        source_line(lin),
        "",
        "Every residual writer (attention output and MLP down projection) and the token embedding get a "
        "rank-1 update `W + B A` with `B = -r` and `A = r^T W` (alpha = rank = 1), which removes a refusal "
        f"direction `r` found with COSMIC (layer {direction.layer}, position {direction.position}, direction "
        f"SHA-256 `{direction.digest[:16]}`): {n_modules} modules.",
        "",
        f'transformers: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), THIS_FOLDER)`, '
        "with peft >= 0.18 (older releases leave the embedding update unscaled on Gemma models).",
    ]
    if with_gguf:
        body.append("llama.cpp: `llama-cli -m BASE.gguf --lora adapter.gguf` (the base may be quantized).")
    body += ["", "Check it: `cosmic-bake verify BASE THIS_FOLDER --direction RUN_DIR`. Hashes in `manifest.json`."]
    return "\n".join([*front, "", *body]) + "\n"
