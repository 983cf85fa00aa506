"""``eval`` command: refusal rates and KL of a model, with or without an intervention."""

from __future__ import annotations

import json

import click

from cosmic_bake.cli.options import cli_session, command_options, echo_table, rate_text
from cosmic_bake.settings import EvalSettings


@click.command("eval")
@command_options(EvalSettings)
def eval_cmd(**params) -> None:
    """Refusal rates on harmful and harmless prompts, and harmless first-token KL.

    KL is against the same model without the hook, or against --kl-against (for a baked model).
    """
    from cosmic_bake.api import evaluate

    s = EvalSettings.build(**params)
    show(s, evaluate(s, session=cli_session()))


def show(s: EvalSettings, rep) -> None:
    """The rates and KL of an :class:`~cosmic_bake.verify.evaluate.EvalReport`."""
    runtime = "transformers" if rep.runtime == "transformers" else "llama.cpp"
    click.echo(f"eval of {s.model} with intervention '{s.kind}' ({runtime})")
    echo_table(
        [
            ("harmful refusal", rate_text(rep.harmful_refusal_rate, rep.n_harmful)),
            ("harmless refusal", rate_text(rep.harmless_refusal_rate, rep.n_harmless)),
            ("harmless KL", f"{rep.harmless_kl:.4f}" + (" (vs --kl-against)" if s.kl_against else "")),
            ("new tokens", rep.new_tokens),
            ("seconds", f"{rep.seconds:.1f}"),
        ]
    )
    if s.output is not None:
        click.echo(f"  written           {s.output}")
    else:
        click.echo(json.dumps(rep.summary()))
