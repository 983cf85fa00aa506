"""``bake`` command: the direction of a run folder baked into a model (hf folder, GGUF file or LoRA)."""

from __future__ import annotations

from collections import Counter

import click

from cosmic_bake.cli.options import cli_session, command_options, echo_table
from cosmic_bake.settings import BakeSettings


@click.command("bake")
@command_options(BakeSettings)
def bake_cmd(**params) -> None:
    """Bake the refusal direction of RUN_DIR into MODEL's weights; write a model folder (hf) or file (gguf)."""
    from cosmic_bake.api import bake

    s = BakeSettings.build(**params)
    show(s, bake(s, session=cli_session()))


def show(s: BakeSettings, result) -> None:
    """What a bake wrote: by format, the LoRA sizes, the GGUF types or the folder's edits."""
    {"lora": _show_lora, "gguf": _show_gguf, "hf": _show_folder}[s.format](s, result)
    for warning in result["warnings"] if isinstance(result, dict) else result.warnings:
        click.echo(f"warning: {warning}", err=True)


def _show_lora(s: BakeSettings, done: dict) -> None:
    click.echo(f"LoRA adapters for {s.model}: {done['modules']} modules (rank 1)")
    echo_table(
        [(name, f"{size / 2**20:.2f} MiB") for name, size in sorted(done["bytes"].items())]
        + [("written", str(s.output))]
    )


def _show_folder(s: BakeSettings, report) -> None:
    click.echo(f"baked {s.model} ({report.model_type}, {report.n_layers} layers, d={report.d_model})")
    edits = ", ".join(f"{n} {k}" for k, n in sorted(report.edits.items()))
    echo_table(
        [
            ("direction", f"layer {report.layer}, position {report.position}, sha256 {report.direction_digest[:12]}"),
            ("mode", report.mode + ("" if report.mode == "ablate" else f", alpha {report.alpha:g}: {report.constant}")),
            ("writers", f"{len(report.writers)} residual writers, embeddings: {len(report.embeddings_edited)}"),
            ("tensors", edits),
            ("embeddings", s.embeddings + (" (output head untied)" if report.untied else "")),
            ("files", ", ".join(report.files)),
            ("seconds", f"{report.timings.get('total', 0.0):.1f}"),
            ("written", str(s.output)),
        ]
    )


def _show_gguf(s: BakeSettings, bake: dict) -> None:
    from cosmic_bake.bake.gguf import manifest_path
    from cosmic_bake.verify.tolerances import gguf_class

    click.echo(f"baked {s.model} -> {s.output} ({bake['route']}, {bake.get('architecture', '')})")
    rows = [("tensors", ", ".join(f"{n} {k}" for k, n in sorted(bake["edits"].items())))]
    if "types" in bake:
        kinds = Counter(bake["types"].values())
        rows.append(("edited types", ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items()))))
        rows.append(("output head", bake["output_head"]))
    else:
        rows.append(("outtype", bake["outtype"]))
    size = bake["bytes_written"]
    source = f" (source {bake['source_bytes'] / 2**20:.1f} MiB)" if "source_bytes" in bake else ""
    rows += [
        ("size", f"{size / 2**20:.1f} MiB{source}"),
        ("seconds", f"{bake['seconds']:.1f}"),
        ("written", f"{s.output} (+ {manifest_path(s.output).name})"),
    ]
    echo_table(rows)
    low = [n for n, t in bake.get("types", {}).items() if gguf_class(t.split(" -> ")[1]) in ("5-bit", "4-bit", "lower")]
    if low:
        click.echo(
            f"note: {len(low)} edited tensors keep a 4/5-bit type, whose rounding partly restores the removed "
            "direction; --edited-type-always writes them as --edited-type (q8_0) and follows the hook more closely",
            err=True,
        )
