"""``verify`` command: a baked model against the original with the runtime hook (exit 1 on FAIL)."""

from __future__ import annotations

import sys

import click

from cosmic_bake.cli.options import cli_session, command_options, echo_table, num_text
from cosmic_bake.settings import VerifySettings

HOOKS = {"ablate": "removal", "add": "addition", "affine": "pinned affine", "scale": "midpoint scaling"}


@click.command("verify")
@command_options(VerifySettings)
def verify_cmd(**params) -> None:
    """Compare BAKED with ORIGINAL + the hook it equals, the unedited model and the weights; exit 1 on a failed gate."""
    from cosmic_bake.api import verify

    s = VerifySettings.build(**params)
    report = verify(s, session=cli_session())
    show(s, report)
    if not report.passed:
        sys.exit(1)


def show(s: VerifySettings, report) -> None:
    """The gates of a :class:`~cosmic_bake.verify.logits.VerifyReport`, its weight table and FAIL reasons."""
    from cosmic_bake.api import baked_direction

    direction = baked_direction(s.direction, s.baked)
    runtime = f"{report.runtime}, {report.weight_type or report.dtype}"
    if report.stored_dtype:
        runtime += f", stored as {report.stored_dtype}"
    hook = HOOKS[direction.mode]
    click.echo(f"verify {s.baked} ({runtime}) against {s.original} + {hook} hook ({report.n_prompts} prompts)")
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
    if s.output is not None:
        click.echo(f"  written            {s.output}")
