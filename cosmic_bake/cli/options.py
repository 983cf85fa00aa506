"""Click option groups shared by several commands (one definition, the same help everywhere)."""

from __future__ import annotations

import time

import click

from cosmic_bake.errors import CosmicBakeError

SYSTEM_PROMPT_HELP = (
    "System prompt replacing the template's default: TEXT, @FILE, or preset:NAME (preset:refuse-all is the "
    "paper's adversarial complete-refusal setting)."
)


INPUT_FILES = "cosmic_bake.input_files"  # ctx.meta key: files option callbacks read (for the output rule)


def _read_system_prompt(ctx, _param, value):
    """Read the prompt's text now; remember an @FILE / preset file as an input the output may not touch."""
    from cosmic_bake.outputs import file_inputs
    from cosmic_bake.prompts.presets import read_system_prompt

    if value is not None and value.startswith(("@", "preset:")):
        ctx.meta.setdefault(INPUT_FILES, []).extend(file_inputs(value))
    return read_system_prompt(value)


def cli_inputs(*values) -> list:
    """The local inputs a command names: files/folders in ``values`` and the files its callbacks read.

    ``values`` are option values as given (model specs go through ``model_inputs``); the system
    prompt's @FILE arrives here as text, so its callback records the path in ``ctx.meta``.
    """
    from cosmic_bake.outputs import file_inputs

    ctx = click.get_current_context(silent=True)
    return [*file_inputs(*values), *(ctx.meta.get(INPUT_FILES, []) if ctx is not None else [])]


def system_prompt_option(f):
    """``--system-prompt TEXT|@FILE|preset:NAME``, handed to the command as the prompt's text."""
    return click.option("--system-prompt", default=None, callback=_read_system_prompt, help=SYSTEM_PROMPT_HELP)(f)


def eval_sets(f):
    """The prompt-set and generation options shared by ``eval`` and ``sweep``."""
    options = [
        click.option("--harmful", default="builtin:harmful", show_default=True),
        click.option("--harmless", default="builtin:harmless", show_default=True),
        click.option("--column", default=None),
        click.option("--limit-harmful", default=None, type=click.IntRange(1)),
        click.option("--limit-harmless", default=100, show_default=True, type=click.IntRange(1)),
        click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1)),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def common_options(f):
    """Model-loading options shared by every command that loads a model for hooks."""
    options = [
        click.option(
            "--chat-template", default=None, help="Jinja template or format string with {instruction} (FILE or STRING)."
        ),
        system_prompt_option,
        click.option(
            "--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"])
        ),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096)),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def parse_eval_layers(value: str | None) -> list[int] | float | None:
    """``--eval-layers``: ``0.2`` (a fraction of the layers, lowest similarity first) or ``19,23``."""
    from cosmic_bake.errors import CosmicBakeError

    if value is None:
        return None
    text = value.strip()
    try:
        if "." in text and "," not in text:
            return float(text)
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CosmicBakeError(
            f"--eval-layers '{value}' is neither a fraction nor a list of layer indices", "pass e.g. 0.2 or 19,23"
        ) from None


def selection_options(f):
    """The options that say how candidates are made and scored (``select`` and ``compare``)."""
    options = [
        click.option(
            "--direction-method",
            type=click.Choice(["mean", "pca"]),
            default="mean",
            show_default=True,
            help="Difference in means (the paper), or the first principal component of the paired differences.",
        ),
        click.option(
            "--eval-layers",
            default=None,
            help="Override L_low: a fraction of the layers (e.g. 0.2) or layer indices (e.g. 19,23). Default: 10%.",
        ),
        click.option("--kl-threshold", default=0.1, show_default=True, type=float),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def training_sets(f):
    """The training and validation prompt options of the commands that select (``select``, ``compare``)."""
    options = [
        click.option("--harmful", default="builtin:harmful", show_default=True, help="Harmful training prompts."),
        click.option("--harmless", default="builtin:harmless", show_default=True, help="Harmless training prompts."),
        click.option(
            "--harmful-val",
            default=None,
            help="Harmful validation prompts (default: hold out the last 16, at most 20%, of --harmful).",
        ),
        click.option(
            "--harmless-val",
            default=None,
            help="Harmless validation prompts (default: hold out the last 16, at most 20%, of --harmless).",
        ),
        click.option("--column", default=None, help="Column holding the prompt in csv/parquet/json/Hub sets."),
        click.option(
            "--limit", default=None, type=click.IntRange(1), help="Use at most N prompts of each training set."
        ),
        click.option(
            "--limit-val", default=None, type=click.IntRange(1), help="Use at most N prompts of each validation set."
        ),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


LLAMACPP_EVAL_CTX = 2048  # prompt + new tokens per sequence in llama.cpp eval


def echo_kv(pairs: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        click.echo(f"  {k.ljust(width)}  {v}")


def rate_text(rate: float, n: int) -> str:
    return f"{rate:.3f} ({round(rate * n)}/{n})"


def load_with_echo(model: str, dtype: str, chat_template: str | None, system_prompt: str | None):
    from cosmic_bake.api import load

    t = time.perf_counter()
    lm, arch, fmt = load(model, dtype, chat_template, system_prompt)
    click.echo(
        f"loaded {model} ({arch.model_type}, {arch.n_layers} layers, d={arch.d_model}, "
        f"{'tied' if arch.tied else 'untied'} embeddings) in {time.perf_counter() - t:.1f}s",
        err=True,
    )
    return lm, arch, fmt


def load_for_eval(model: str, runtime: str, kind: str, dtype: str, chat_template, system_prompt):
    """(model, arch, fmt): a transformers model with its probe, or a llama.cpp model (arch None)."""
    from cosmic_bake.model.loading import load_tokenizer, resolve

    source = resolve(model)
    use_llamacpp = runtime == "llama.cpp" or (runtime == "auto" and source.kind == "gguf" and kind == "none")
    if not use_llamacpp:
        lm, arch, fmt = load_with_echo(model, dtype, chat_template, system_prompt)
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


def parse_alphas(text: str | None) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` with a one-line error for anything else."""
    if text is None:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        problem = f"--alphas '{text}' is not a comma-separated list of numbers"
        raise CosmicBakeError(problem, "e.g. --alphas 0,0.5,1,2") from None


def echo_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"  {k.ljust(width)}  {v}")


def num_text(x: float | None) -> str:
    """A figure of the JSON report (None stands for a non-finite number there)."""
    return "inf" if x is None else f"{x:.3g}"
