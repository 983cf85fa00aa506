"""``bake`` and ``verify`` commands: options in, pipeline stages out; no math here.

Registered by ``cli.py`` (``cli.add_command(bake_cmd)``, ``cli.add_command(verify_cmd)``).
``verify`` exits with status 1 when the baked model is outside tolerance, so scripts and CI can
gate on it; user errors raise :class:`CosmicBakeError` (exit status 2 through ``cli.main``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from cosmic_bake.cli.options import cli_inputs, echo_table
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export.ggml_quant import EDITED_TYPES, FILE_TYPES


@click.command("bake")
@click.argument("model")
@click.option(
    "--direction", "run_dir", required=True, type=click.Path(path_type=Path), help="RUN_DIR written by select."
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["hf", "gguf", "lora"]),
    default="hf",
    show_default=True,
    help="Output: a transformers folder, a GGUF file, or LoRA adapters (PEFT + llama.cpp) for an unchanged base.",
)
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Folder (hf) or .gguf file to write."
)
@click.option(
    "--embeddings",
    type=click.Choice(["untie", "skip"]),
    default="untie",
    show_default=True,
    help="Edit the token embedding (untying a tied output head), or leave it alone (differs from the hook).",
)
@click.option("--force", is_flag=True, help="Replace an earlier cosmic-bake output (or an empty folder) at -o.")
@click.option("--max-shard-size", default=None, help="Reshard the output (e.g. 2GB); default: the source's shards.")
@click.option("--allow-mismatch", is_flag=True, help="Bake a direction selected on a different model file.")
@click.option(
    "--outtype",
    type=click.Choice(list(FILE_TYPES), case_sensitive=False),
    default=None,
    help="GGUF output type (llama.cpp quantizer for q*). Default: keep a GGUF source's types, else f16.",
)
@click.option(
    "--edited-type",
    type=click.Choice(list(EDITED_TYPES), case_sensitive=False),
    default="q8_0",
    show_default=True,
    help="GGUF source: type for edited tensors whose own type cannot hold them.",
)
@click.option(
    "--mode",
    type=click.Choice(["ablate", "add", "affine", "scale"]),
    default=None,
    help="Edit to bake (default: the direction's): remove, add alpha*r at its layer, ACE pinned there, "
    "or scale the component around the harmful/harmless midpoint by 1 + alpha.",
)
@click.option("--alpha", type=float, default=None, help="Coefficient for add / affine (default: the direction's).")
@click.option(
    "--edited-type-always",
    is_flag=True,
    help="GGUF source: write every edited tensor as --edited-type (closer to the hook than a 4-bit source type).",
)
def bake_cmd(
    model,
    run_dir,
    out_format,
    out,
    embeddings,
    force,
    max_shard_size,
    allow_mismatch,
    outtype,
    mode,
    alpha,
    edited_type,
    edited_type_always,
) -> None:
    """Bake the refusal direction of RUN_DIR into MODEL's weights; write a model folder (hf) or file (gguf)."""
    from cosmic_bake.api import bake
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import check_target

    inputs = [*model_inputs(model), *cli_inputs(run_dir)]
    check_target(out, force=force, inputs=inputs, kind="gguf" if out_format == "gguf" else "folder")
    if out_format == "lora":
        from cosmic_bake.api import export_lora

        if outtype is not None or (mode not in (None, "ablate")):
            raise CosmicBakeError("--format lora carries linear removal only", "drop --outtype / --mode")
        done = export_lora(model, run_dir, out, force=force, allow_mismatch=allow_mismatch, inputs=inputs)
        click.echo(f"LoRA adapters for {model}: {done['modules']} modules (rank 1)")
        echo_table(
            [(name, f"{size / 2**20:.2f} MiB") for name, size in sorted(done["bytes"].items())]
            + [("written", str(out))]
        )
        return
    if out_format == "gguf":
        _bake_gguf(
            model,
            run_dir,
            out,
            outtype,
            edited_type,
            edited_type_always,
            embeddings,
            force,
            allow_mismatch,
            mode,
            alpha,
            inputs,
        )
        return
    if outtype is not None:
        raise CosmicBakeError("--outtype applies to --format gguf", "drop --outtype, or pass --format gguf")
    report = bake(
        model,
        run_dir,
        out,
        embeddings=embeddings,
        force=force,
        max_shard_size=max_shard_size,
        allow_mismatch=allow_mismatch,
        mode=mode,
        alpha=alpha,
        inputs=inputs,
    )
    click.echo(f"baked {model} ({report.model_type}, {report.n_layers} layers, d={report.d_model})")
    edits = ", ".join(f"{n} {k}" for k, n in sorted(report.edits.items()))
    echo_table(
        [
            ("direction", f"layer {report.layer}, position {report.position}, sha256 {report.direction_digest[:12]}"),
            ("mode", report.mode + ("" if report.mode == "ablate" else f", alpha {report.alpha:g}: {report.constant}")),
            ("writers", f"{len(report.writers)} residual writers, embeddings: {len(report.embeddings_edited)}"),
            ("tensors", edits),
            ("embeddings", embeddings + (" (output head untied)" if report.untied else "")),
            ("files", ", ".join(report.files)),
            ("seconds", f"{report.timings.get('total', 0.0):.1f}"),
            ("written", str(out)),
        ]
    )
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)


def _bake_gguf(
    model, run_dir, out, outtype, edited_type, always, embeddings, force, allow_mismatch, mode, alpha, inputs
):
    from cosmic_bake.api import bake as bake_model
    from cosmic_bake.bake.gguf import manifest_path
    from cosmic_bake.verify.tolerances import gguf_class

    bake = bake_model(
        model,
        run_dir,
        out,
        format="gguf",
        outtype=outtype and outtype.lower(),
        edited_type=edited_type.lower(),
        edited_type_always=always,
        embeddings=embeddings,
        force=force,
        allow_mismatch=allow_mismatch,
        mode=mode,
        alpha=alpha,
        inputs=inputs,
    )
    click.echo(f"baked {model} -> {out} ({bake['route']}, {bake.get('architecture', '')})")
    rows = [("tensors", ", ".join(f"{n} {k}" for k, n in sorted(bake["edits"].items())))]
    if "types" in bake:
        kinds = Counter(bake["types"].values())
        rows.append(("edited types", ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items()))))
        rows.append(("output head", bake["output_head"]))
    else:
        rows.append(("outtype", bake["outtype"]))
    size = bake["bytes_written"]
    rows += [
        (
            "size",
            f"{size / 2**20:.1f} MiB"
            + (f" (source {bake['source_bytes'] / 2**20:.1f} MiB)" if "source_bytes" in bake else ""),
        ),
        ("seconds", f"{bake['seconds']:.1f}"),
        ("written", f"{out} (+ {manifest_path(out).name})"),
    ]
    echo_table(rows)
    for warning in bake.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    low = [n for n, t in bake.get("types", {}).items() if gguf_class(t.split(" -> ")[1]) in ("5-bit", "4-bit", "lower")]
    if low:
        click.echo(
            f"note: {len(low)} edited tensors keep a 4/5-bit type, whose rounding partly restores the removed "
            "direction; --edited-type-always writes them as --edited-type (q8_0) and follows the hook more closely",
            err=True,
        )
