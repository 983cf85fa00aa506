"""The Python API: each stage of select -> bake -> export -> verify as one call.

The command line is a thin layer over these functions, so a script gets exactly what the
commands do (same defaults, same files, same errors):

    from cosmic_bake import api

    run = api.select("builtin:smollm2-135m-instruct", "out/run", limit=32, limit_val=4)
    api.bake("builtin:smollm2-135m-instruct", run, "out/model")                         # transformers
    api.bake("builtin:smollm2-135m-instruct", run, "out/model.gguf", format="gguf", outtype="q8_0")
    print(api.verify("builtin:smollm2-135m-instruct", "out/model", run).passed)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.devices import Placement
from cosmic_bake.prompts.sets import prompt_sets, verify_prompts


def load(
    model: str,
    dtype: str = "float32",
    chat_template: str | None = None,
    system_prompt: str | None = None,
    placement: Placement | None = None,
):
    """``(LoadedModel, Architecture, ChatFormat)`` for a Hub id, folder, .gguf file or builtin name.

    ``chat_template`` is a Jinja template or a format string (or a file holding one);
    ``system_prompt`` replaces the template's default system prompt (text, see
    :func:`~cosmic_bake.prompts.presets.read_system_prompt` for ``@FILE`` / ``preset:NAME``).
    ``placement`` (:class:`~cosmic_bake.model.devices.Placement`) chooses the device or accelerate's
    device map / memory budget / disk offload (default: the best device present); ``dtype`` ``auto``
    is bfloat16 on a GPU, float32 on the CPU.
    """
    from cosmic_bake.model.architecture import probe
    from cosmic_bake.model.chat import ChatFormat, read_template_option
    from cosmic_bake.model.loading import load_model

    lm = load_model(model, dtype=dtype, placement=placement)
    arch = probe(lm.model)
    return lm, arch, ChatFormat(lm.tokenizer, read_template_option(chat_template), system_prompt)


def select(
    model: str,
    out: str | Path,
    *,
    harmful: str = "builtin:harmful",
    harmless: str = "builtin:harmless",
    harmful_val: str | None = None,
    harmless_val: str | None = None,
    column: str | None = None,
    limit: int | None = None,
    limit_val: int | None = None,
    mode: str = "ablate",
    selector: str = "cosmic",
    direction_method: str = "mean",
    eval_layers: list[int] | float | None = None,
    kl_threshold: float = 0.1,
    alphas: list[float] | None = None,
    max_harmless_refusal: float = 0.05,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    dtype: str = "float32",
    batch_size: int | str = 32,
    force: bool = False,
    loaded=None,
    inputs: Iterable[str | os.PathLike] = (),
    placement: Placement | None = None,
) -> Path:
    """Choose a direction with COSMIC (or the refusal-score baseline) and write the run folder ``out``.

    ``loaded`` reuses a ``load(...)`` result. Returns ``out``; its ``selection.json`` holds every
    candidate's scores and its ``direction.safetensors`` the artifact ``bake`` reads. ``out`` may
    not be, contain or lie inside the model or a prompt / template file; ``inputs`` adds paths
    this call cannot see (the CLI's system prompt @FILE). ``force`` replaces only an earlier
    cosmic-bake output or an empty folder (:func:`cosmic_bake.outputs.check_target`).
    ``batch_size`` ``"auto"``: 128 on a GPU, halved on out-of-memory (32 on the CPU); ``placement``
    as in :func:`load`.
    """
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import check_target, file_inputs
    from cosmic_bake.select.run_folder import run_select

    out = Path(out)
    inputs = [
        *model_inputs(model),
        *file_inputs(harmful, harmless, harmful_val, harmless_val, chat_template),
        *inputs,
    ]
    check_target(out, force=force, inputs=inputs)
    if alphas and mode != "affine":
        raise CosmicBakeError("--alphas applies to --mode affine", "drop --alphas, or select with --mode affine")
    sets = prompt_sets(harmful, harmless, harmful_val, harmless_val, column, limit, limit_val)
    lm, arch, fmt = loaded or load(model, dtype, chat_template, system_prompt, placement)
    run_select(
        lm,
        arch,
        fmt,
        sets,
        out,
        mode=mode,
        selector=selector,
        batch_size=batch_size,
        kl_threshold=kl_threshold,
        force=force,
        inputs=inputs,
        alphas=alphas,
        max_harmless_refusal=max_harmless_refusal,
        eval_layers=eval_layers,
        direction_method=direction_method,
        settings={
            "chat_template": chat_template,
            "system_prompt": system_prompt,
            "dtype": dtype,
            "harmful": harmful,
            "harmless": harmless,
            "harmful_val": harmful_val,
            "harmless_val": harmless_val,
            "column": column,
            "limit": limit,
            "limit_val": limit_val,
            "alphas": alphas,
            "max_harmless_refusal": max_harmless_refusal,
            "direction_method": direction_method,
            "eval_layers": eval_layers,
        },
    )
    return out


def bake(model: str, direction: str | Path, out: str | Path, *, format: str = "hf", **options):  # noqa: A002
    """Bake ``direction`` (a run folder) into ``model``; write a folder (``hf``) or a ``.gguf`` file.

    ``options`` are the bake command's: ``embeddings``, ``force``, ``allow_mismatch``, ``mode``,
    ``alpha``, and ``max_shard_size`` (hf) or ``outtype``, ``edited_type``, ``edited_type_always``
    (gguf), and ``inputs`` (more paths ``out`` must keep clear of, besides the model and the
    direction). Returns the :class:`~cosmic_bake.bake.folder.BakeReport` (hf) or the GGUF bake's record.
    """
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import check_target

    inputs = [*model_inputs(model), *([direction] if isinstance(direction, str | os.PathLike) else [])]
    inputs += list(options.pop("inputs", ()))
    if format == "gguf":
        from cosmic_bake.bake.gguf import bake_to_gguf

        return bake_to_gguf(model, Path(direction), Path(out), inputs=inputs, **options)
    if format != "hf":
        raise CosmicBakeError(f"unknown format '{format}'", "use hf or gguf")
    from cosmic_bake.bake.folder import bake_folder
    from cosmic_bake.model.loading import source_folder

    check_target(out, force=options.get("force", False), inputs=inputs)  # before a GGUF source is dequantized
    source, folder = source_folder(model)
    return bake_folder(folder, direction, out, source=source, inputs=inputs, **options)


def verify(
    original: str,
    baked: str | Path,
    direction: str | Path,
    *,
    prompts: str | None = None,
    column: str | None = None,
    limit: int | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    dtype: str = "float32",
    batch_size: int | str = 8,
    placement: Placement | None = None,
):
    """Compare ``baked`` (a folder, or a .gguf run in llama.cpp) with ``original`` + the hook it equals.

    The hook is that of the mode and alpha recorded in the baked output. Returns a
    :class:`~cosmic_bake.verify.logits.VerifyReport` (``.passed``, KL and logit figures, the relative
    gate against the unedited model, and the prompt-free weight-space check in ``.weights``).
    ``placement`` applies to both transformers models; ``batch_size`` ``"auto"`` as in :func:`select`
    (8 on the CPU).
    """
    from cosmic_bake.artifacts import Direction, baked_settings
    from cosmic_bake.verify.logits import add_weight_check
    from cosmic_bake.verify.weights import weight_check

    d = Direction.load(direction)
    settings = baked_settings(str(baked))
    if settings is not None:
        d = d.with_mode(*settings)

    report = _verify_logits(
        original,
        baked,
        d,
        verify_prompts(prompts, column, limit),
        dtype,
        chat_template,
        system_prompt,
        batch_size,
        placement,
    )
    return add_weight_check(report, weight_check(original, baked, d))


def _verify_logits(original, baked, d, texts, dtype, chat_template, system_prompt, batch_size, placement=None):
    """The logit comparison of :func:`verify`, by the baked output's kind."""
    from cosmic_bake.model.batching import resolve_batch_size
    from cosmic_bake.model.devices import input_device

    a, arch, fmt = load(original, dtype, chat_template, system_prompt, placement)
    batch_size = resolve_batch_size(batch_size, input_device(a.model), 8)

    baked = Path(baked)
    if baked.is_dir() and (baked / "adapter_config.json").is_file():  # a LoRA folder: base + PEFT adapter
        from cosmic_bake.export.lora import check_peft
        from cosmic_bake.model.loading import load_model

        base = load_model(original, dtype=dtype, placement=placement).model
        check_peft(base)  # before importing peft: an old one may not even import
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(base, str(baked)).eval()
        return _compare(a.model, arch, adapted, d, texts, fmt, batch_size)
    if baked.suffix.lower() == ".gguf":
        if _is_adapter(baked):  # llama.cpp LoRA on the base GGUF
            if a.source.kind != "gguf":
                raise CosmicBakeError(
                    f"{baked.name} is a llama.cpp LoRA adapter; it needs a GGUF base",
                    "pass the base model's .gguf file as ORIGINAL",
                )
            return _verify_gguf(a, arch, a.source.path, d, texts, fmt, original, lora=baked)
        return _verify_gguf(a, arch, baked, d, texts, fmt, original)
    from cosmic_bake.model.loading import load_model
    from cosmic_bake.verify.tolerances import stored_dtype

    b = load_model(str(baked), dtype=dtype, placement=placement)
    return _compare(a.model, arch, b.model, d, texts, fmt, batch_size, stored=stored_dtype(baked))


def _compare(original_model, arch, baked_model, d, texts, fmt, batch_size: int, **kw):
    """:func:`cosmic_bake.verify.logits.verify`, run again with half the batch on out-of-memory."""
    from cosmic_bake.model.batching import with_backoff
    from cosmic_bake.verify.logits import verify as verify_models

    run = lambda n: verify_models(original_model, arch, baked_model, d, texts, fmt, n, **kw)  # noqa: E731
    return with_backoff(run, batch_size)[0]


def _is_adapter(path: Path) -> bool:
    from cosmic_bake.export.gguf_io import field_value, open_gguf

    return field_value(open_gguf(path), "general.type") == "adapter"


def _verify_gguf(a, arch, baked: Path, direction, prompts: list[str], fmt, original: str, lora: Path | None = None):
    """Run the baked GGUF in llama.cpp, and the unedited model stored the same way (relative gate, floor)."""
    from cosmic_bake.model.llamacpp import LlamaCppModel
    from cosmic_bake.verify.logits import verify_gguf
    from cosmic_bake.verify.reference import unedited_gguf

    if lora is not None:  # the adapter on the base: the base itself is the unedited reference
        reference, record = a.source.path, {"kind": "base GGUF without the adapter", "file": a.source.path.name}
    else:
        reference, record = unedited_gguf(original, a.source, baked)
    longest = max(int(fmt.encode([p])["input_ids"].shape[1]) for p in prompts)
    n_ctx = max(64, longest + 8)
    model = LlamaCppModel(baked, n_ctx=n_ctx, all_logits=True, lora=lora)
    unedited = LlamaCppModel(reference, n_ctx=n_ctx, all_logits=True)
    try:
        return verify_gguf(a.model, arch, model, direction, prompts, fmt, unedited=unedited, unedited_reference=record)
    finally:
        model.close()
        unedited.close()


def export_lora(
    model: str,
    direction: str | Path,
    out: str | Path,
    *,
    gguf: bool = True,
    force: bool = False,
    allow_mismatch: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    placement: Placement | None = None,
) -> dict:
    """Write the removal edit as LoRA adapters: a PEFT folder (and ``adapter.gguf`` for llama.cpp).

    The base stays as it is: load it and apply the adapter (``PeftModel.from_pretrained``, or
    llama.cpp ``--lora OUT/adapter.gguf`` on the base GGUF). Returns what was written, with sizes.
    ``out`` follows the output rule against the model, the direction and ``inputs``.
    """
    from cosmic_bake.artifacts import Direction, check_direction, model_hash, source_record
    from cosmic_bake.export import lora
    from cosmic_bake.model.loading import model_inputs
    from cosmic_bake.outputs import check_target

    out = Path(out)
    inputs = [*model_inputs(model), direction, *inputs]
    check_target(out, force=force, inputs=inputs)
    d = Direction.load(direction)
    if d.mode != "ablate":
        raise CosmicBakeError(
            f"a LoRA carries linear removal only, not the '{d.mode}' edit's constant",
            "bake the full model (--format hf or gguf) for add / affine",
        )
    lm, arch, _ = load(model, placement=placement)
    src = source_record(lm.source)
    check_direction(d, arch.d_model, model_hash(src), allow_mismatch)
    return lora.write_lora_folder(lm, arch, d, out, src=src, gguf=gguf, force=force, inputs=inputs)
