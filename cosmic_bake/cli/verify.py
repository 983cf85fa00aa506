"""``verify`` command: a baked model against the original with the runtime hook (exit 1 on FAIL)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cosmic_bake.cli.options import cli_inputs, echo_table, num_text, system_prompt_option


@click.command("verify")
@click.argument("original")
@click.argument("baked")
@click.option("--direction", "run_dir", required=True, type=click.Path(path_type=Path), help="RUN_DIR used for baking.")
@click.option("--prompts", "prompts_file", default=None, help="Prompt file or dataset (default: 16+16 built-ins).")
@click.option("--column", default=None, help="Column holding the prompt in csv/parquet/json sets.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Use at most N prompts (per built-in set).")
@click.option("-o", "--output", "out", default=None, type=click.Path(path_type=Path), help="JSON report to write.")
@click.option("--force", is_flag=True, help="Replace an earlier cosmic-bake report at -o.")
@click.option("--chat-template", default=None, help="Jinja template or format string with {instruction}.")
@system_prompt_option
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096))
def verify_cmd(
    original, baked, run_dir, prompts_file, column, limit, out, force, chat_template, system_prompt, dtype, batch_size
) -> None:
    """Compare BAKED with ORIGINAL + the hook it equals, the unedited model and the weights; exit 1 on a failed gate."""
    from cosmic_bake.api import verify
    from cosmic_bake.artifacts import Direction, baked_settings
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import check_target, write_report

    inputs = [*model_inputs(original), *model_inputs(baked), *cli_inputs(run_dir, prompts_file, chat_template)]
    if out is not None:
        check_target(out, force=force, inputs=inputs, kind="json")
    report = verify(
        original,
        baked,
        run_dir,
        prompts=prompts_file,
        column=column,
        limit=limit,
        chat_template=chat_template,
        system_prompt=system_prompt,
        dtype=dtype,
        batch_size=batch_size,
    )
    direction = Direction.load(run_dir)
    settings = baked_settings(baked)
    if settings is not None:
        direction = direction.with_mode(*settings)
    runtime = f"{report.runtime}, {report.weight_type or report.dtype}"
    if report.stored_dtype:
        runtime += f", stored as {report.stored_dtype}"
    hook = {"ablate": "removal", "add": "addition", "affine": "pinned affine", "scale": "midpoint scaling"}[
        direction.mode
    ]
    click.echo(f"verify {baked} ({runtime}) against {original} + {hook} hook ({report.n_prompts} prompts)")
    gate = {"max_kl": "max KL", "mean_kl": "mean KL"}[report.gate]
    rows = [
        ("positions", str(report.n_positions)),
        ("max |delta logit|", f"{report.max_abs_logit_diff:.3e}"),
        ("mean KL", f"{report.mean_kl:.3e}"),
        ("max KL", f"{report.max_kl:.3e}"),
        ("top-1 agreement", f"{report.top1_agreement:.4f}  (tolerance {report.top1_tolerance})"),
        ("tolerance", f"{gate} <= {report.kl_tolerance:.2g}"),
    ]
    if report.unedited_mean_kl is not None:
        ref = report.unedited_reference or {}
        rows.append(
            ("unedited", f"mean KL {report.unedited_mean_kl:.3e} ({ref.get('kind', '')} {ref.get('file', '')})")
        )
        rows.append(("ratio", f"{report.ratio:.4f}  (baked / unedited; at most {report.ratio_max:g})"))
    if report.runtime_floor:
        f = report.runtime_floor
        rows.append(
            (
                "runtime floor",
                f"unedited GGUF vs transformers: mean KL {f['mean_kl']:.3e}, max KL {f['max_kl']:.3e}, "
                f"top-1 {f['top1_agreement']:.4f}",
            )
        )
    rows.append(("result", "PASS" if report.passed else "FAIL"))
    echo_table(rows)
    if report.weights:
        click.echo("weight-space check (component along the direction, per tensor class):")
        for row in report.weights["classes"]:
            click.echo(
                f"  {row['cls']:<12} {row['stored_type']:<8} {row['n_tensors']:>4} tensors, {row['n_failed']} failed, "
                f"max residual {num_text(row['max_residual'])}, max ratio to rounding {num_text(row['max_ratio'])}  "
                + ("pass" if row["passed"] else "FAIL")
            )
    for reason in report.reasons:
        click.echo(f"FAIL: {reason}")
    if not report.passed and report.weight_type in ("6-bit", "5-bit", "4-bit", "lower"):
        click.echo(
            "hint: coarse types round part of the edit away; bake with --edited-type-always or a finer --outtype"
        )
    if out is not None:
        data = {"original": original, "baked": baked, "direction": str(run_dir), **report.to_dict()}
        write_report(out, data, force=force, inputs=inputs)
        click.echo(f"  written            {out}")
    if not report.passed:
        sys.exit(1)
