"""``eval`` command: refusal rates and KL of a model, with or without an intervention."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cosmic_bake.cli.options import (
    cli_inputs,
    common_options,
    echo_kv,
    eval_sets,
    load_for_eval,
    rate_text,
)
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.builtin import DEFAULT_MODEL


@click.command("eval")
@click.argument("model", default=DEFAULT_MODEL, required=False)
@click.option("--direction", "run_dir", default=None, type=click.Path(path_type=Path), help="RUN_DIR from select.")
@click.option(
    "--intervention",
    type=click.Choice(["none", "remove", "add", "affine", "pin", "scale"]),
    default=None,
    help="Hook to apply (default: remove when --direction is given, else none).",
)
@click.option("--alpha", type=float, default=None, help="Coefficient for add/affine (default: the artifact's).")
@eval_sets
@click.option(
    "--kl-against",
    default=None,
    help="Unedited model to measure harmless KL against (for evaluating a baked model; same tokenizer).",
)
@click.option(
    "--runtime",
    type=click.Choice(["auto", "transformers", "llama.cpp"]),
    default="auto",
    show_default=True,
    help="auto: llama.cpp for a .gguf file without a hook (much faster on CPU), else transformers.",
)
@click.option("-o", "--output", "out", default=None, type=click.Path(path_type=Path), help="JSON report to write.")
@click.option("--force", is_flag=True, help="Replace an earlier cosmic-bake report at -o.")
@common_options
def eval_cmd(
    model,
    run_dir,
    intervention,
    alpha,
    harmful,
    harmless,
    column,
    limit_harmful,
    limit_harmless,
    max_new_tokens,
    kl_against,
    runtime,
    out,
    force,
    chat_template,
    system_prompt,
    dtype,
    batch_size,
) -> None:
    """Refusal rates on harmful and harmless prompts, and harmless first-token KL.

    KL is against the same model without the hook, or against --kl-against (for a baked model).
    """
    from cosmic_bake.artifacts import Direction
    from cosmic_bake.model.hooks import Intervention
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import check_target, write_report
    from cosmic_bake.prompts.sets import load_prompts
    from cosmic_bake.verify.evaluate import evaluate

    inputs = [*model_inputs(model), *model_inputs(kl_against), *cli_inputs(run_dir, harmful, harmless, chat_template)]
    if out is not None:
        check_target(out, force=force, inputs=inputs, kind="json")
    kind = intervention or ("remove" if run_dir else "none")
    if kind != "none" and run_dir is None:
        raise CosmicBakeError(f"--intervention {kind} needs a direction", "pass --direction RUN_DIR")
    bad = load_prompts(harmful, column, limit=limit_harmful)
    good = load_prompts(harmless, column, limit=limit_harmless)
    base_logits = None
    if kl_against is not None:
        from cosmic_bake.verify.evaluate import first_token_logits

        ref, _, ref_fmt = load_for_eval(kl_against, runtime, "none", dtype, chat_template, system_prompt)
        base_logits = first_token_logits(ref, ref_fmt, good, min(batch_size, 32))
        del ref
    lm, arch, fmt = load_for_eval(model, runtime, kind, dtype, chat_template, system_prompt)
    iv = None
    if kind != "none":
        d = Direction.load(run_dir)
        a = d.alpha if alpha is None else alpha
        iv = {
            "remove": lambda: Intervention.remove(d.direction),
            "add": lambda: Intervention.add(d.direction, d.layer, 1.0 if alpha is None else alpha),
            "affine": lambda: Intervention.affine(d.direction, d.reference, d.layer, a),
            "pin": lambda: Intervention.pin(d.direction, d.reference, d.layer, a),
            "scale": lambda: Intervention.scale(d.direction, d.reference, d.layer, 1.0 if alpha is None else alpha),
        }[kind]()
    rep = evaluate(
        lm,
        arch,
        fmt,
        harmful=bad,
        harmless=good,
        intervention=iv,
        max_new_tokens=max_new_tokens,
        batch_size=min(batch_size, 32),
        base_logits=base_logits,
    )
    summary = rep.summary()
    click.echo(f"eval of {model} with intervention '{kind}' ({'llama.cpp' if arch is None else 'transformers'})")
    echo_kv(
        [
            ("harmful refusal", rate_text(rep.harmful_refusal_rate, rep.n_harmful)),
            ("harmless refusal", rate_text(rep.harmless_refusal_rate, rep.n_harmless)),
            ("harmless KL", f"{rep.harmless_kl:.4f}" + (" (vs --kl-against)" if kl_against else "")),
            ("new tokens", rep.new_tokens),
            ("seconds", f"{rep.seconds:.1f}"),
        ]
    )
    if out is not None:
        write_report(
            out,
            {"model": model, "direction": str(run_dir) if run_dir else None, **summary, "completions": rep.completions},
            force=force,
            inputs=inputs,
        )
        click.echo(f"  written           {out}")
    else:
        click.echo(json.dumps(summary))
