"""The Python API: each command of select -> bake -> export -> verify (and eval, sweep, compare, push) as one call.

The command line and the recipe runner are thin layers over these functions, so a script gets
exactly what the commands do (same defaults, same files, same errors). Each function takes the
command's options as keywords, or a ready settings object (:mod:`cosmic_bake.settings`) as its
first argument; both are validated by the same settings class:

    from cosmic_bake import api

    run = api.select("builtin:smollm2-135m-instruct", "out/run", limit=32, limit_val=4)
    api.bake("builtin:smollm2-135m-instruct", run, "out/model")                         # transformers
    api.bake("builtin:smollm2-135m-instruct", run, "out/model.gguf", format="gguf", outtype="q8_0")
    print(api.verify("builtin:smollm2-135m-instruct", "out/model", run).passed)

``session`` (a :class:`~cosmic_bake.model.session.Session`) lets several calls share loaded
models; without one, each call loads what it needs. ``placement`` (a
:class:`~cosmic_bake.model.devices.Placement`: device, or accelerate's device map / memory budget /
disk offload) says where the models of a call go; the default takes the best device present (the
plain CPU load on a machine without a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.devices import Placement
from cosmic_bake.model.session import Session
from cosmic_bake.prompts.sets import verify_prompts
from cosmic_bake.settings import (
    BakeSettings,
    CompareSettings,
    EvalSettings,
    PushSettings,
    SelectSettings,
    Settings,
    SweepSettings,
    VerifySettings,
)
from cosmic_bake.settings.groups import BakeOptions

S = TypeVar("S", bound=Settings)
Paths = Iterable[str | os.PathLike]


def _settings(cls: type[S], named: dict[str, Any], options: dict[str, Any]) -> S:
    """The call's settings: a ready ``cls`` instance passed first, or one built from the arguments.

    A ``placement`` (:class:`~cosmic_bake.model.devices.Placement`) among the options stands for
    its four fields (``device``, ``device_map``, ``max_memory``, ``offload_folder``).
    """
    placement = options.pop("placement", None)
    if placement is not None:
        options = {**vars(placement), **options}
    first = next(iter(named.values()))
    if isinstance(first, cls):
        if options or any(v is not None for v in list(named.values())[1:]):
            raise TypeError(f"pass a {cls.__name__} or options, not both")
        return first
    return cls.build(**named, **options)


def _load(session: Session | None, s):
    """The model of ``s`` (its loading and placement options) through ``session``, or a fresh one."""
    return (session or Session()).load(s.model, s.dtype, s.chat_template, s.system_prompt, placement=s.placement())


def _inputs(s: Settings, extra: Paths) -> list:
    """What the output must keep clear of: the inputs the settings name, and ``extra`` paths."""
    from cosmic_bake.outputs import file_inputs

    return [*s.inputs(), *file_inputs(*extra)]


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
    ``dtype`` ``auto`` is bfloat16 on a GPU and float32 on the CPU.
    """
    return Session().load(model, dtype, chat_template, system_prompt, placement=placement)


def select(model: Any = None, output: Any = None, *, session: Session | None = None, inputs: Paths = (), **options):
    """Choose a direction with COSMIC (or the refusal-score baseline) and write the run folder ``output``.

    Options are :class:`~cosmic_bake.settings.SelectSettings`' fields. Returns the run folder; its
    ``selection.json`` holds every candidate's scores and its ``direction.safetensors`` the
    artifact ``bake`` reads. ``output`` may not be, contain or lie inside the model, a prompt /
    template file or ``inputs``; ``force`` replaces only an earlier cosmic-bake output or an
    empty folder (:func:`cosmic_bake.outputs.check_target`).
    """
    from cosmic_bake.outputs import check_target
    from cosmic_bake.select.run_folder import run_select

    s = _settings(SelectSettings, {"model": model, "output": output}, options)
    paths = _inputs(s, inputs)
    check_target(s.output, force=s.force, inputs=paths)
    sets = s.prompt_sets()  # read before loading: a bad prompt file fails in seconds
    lm, arch, fmt = _load(session, s)
    run_select(lm, arch, fmt, sets, s, paths)
    return s.output


def bake(model=None, direction=None, output=None, *, session: Session | None = None, inputs: Paths = (), **options):
    """Bake ``direction`` (a run folder) into ``model``; write a folder (``hf``), a ``.gguf`` file or LoRA adapters.

    Options are :class:`~cosmic_bake.settings.BakeSettings`' fields (``format``, ``embeddings``,
    ``force``, ``allow_mismatch``, ``mode``, ``alpha``, and ``max_shard_size`` (hf) or
    ``outtype``, ``edited_type``, ``edited_type_always`` (gguf)). Returns the
    :class:`~cosmic_bake.bake.folder.BakeReport` (hf), the GGUF bake's record, or what
    :func:`export_lora` returns.
    """
    from cosmic_bake.outputs import check_target

    placement = options.pop("placement", None)  # where a LoRA export loads the base (see export_lora)
    s = _settings(BakeSettings, {"model": model, "direction": direction, "output": output}, options)
    if s.format == "lora":
        return export_lora(s, session=session, inputs=inputs, placement=placement)
    paths = _inputs(s, inputs)
    options = s.group(BakeOptions)
    if s.format == "gguf":
        from cosmic_bake.bake.gguf import bake_to_gguf

        return bake_to_gguf(s.model, s.direction, s.output, inputs=paths, settings=s.record(), **options)
    from cosmic_bake.bake.folder import bake_folder
    from cosmic_bake.model.loading import source_folder

    check_target(s.output, force=s.force, inputs=paths)  # before a GGUF source is dequantized
    source, folder = source_folder(s.model)
    return bake_folder(folder, s.direction, s.output, source=source, inputs=paths, settings=s.record(), **options)


def export_lora(
    model: Any = None,
    direction: Any = None,
    output: Any = None,
    *,
    gguf: bool | None = None,
    session: Session | None = None,
    inputs: Paths = (),
    **options,
) -> dict:
    """Write the removal edit as LoRA adapters: a PEFT folder (and ``adapter.gguf`` for llama.cpp).

    The base stays as it is: load it and apply the adapter (``PeftModel.from_pretrained``, or
    llama.cpp ``--lora OUT/adapter.gguf`` on the base GGUF). Returns what was written, with sizes.
    ``output`` follows the output rule against the model, the direction and ``inputs``.
    """
    from cosmic_bake.artifacts import Direction, check_direction, model_hash, source_record
    from cosmic_bake.export import lora
    from cosmic_bake.outputs import check_target

    placement = options.pop("placement", None)  # the base loads here; the edit itself is device-free
    if not isinstance(model, BakeSettings):
        options = {"format": "lora", "gguf_adapter": gguf, **options}
    s = _settings(BakeSettings, {"model": model, "direction": direction, "output": output}, options)
    paths = _inputs(s, inputs)
    check_target(s.output, force=s.force, inputs=paths)
    d = Direction.load(s.direction)
    if d.mode != "ablate":
        raise CosmicBakeError(
            f"a LoRA carries linear removal only, not the '{d.mode}' edit's constant",
            "bake the full model (--format hf or gguf) for add / affine",
        )
    lm, arch, _ = (session or Session()).load(s.model, placement=placement)
    src = source_record(lm.source, s.record_paths)
    check_direction(d, arch.d_model, model_hash(src), s.allow_mismatch)
    return lora.write_lora_folder(
        lm,
        arch,
        d,
        s.output,
        src=src,
        gguf=s.gguf_adapter,
        force=s.force,
        inputs=paths,
        base_model=s.base_model,
        record_paths=s.record_paths,
        settings=s.record(),
    )


def verify(original=None, baked=None, direction=None, *, session: Session | None = None, inputs: Paths = (), **options):
    """Compare ``baked`` (a folder, or a .gguf run in llama.cpp) with ``original`` + the hook it equals.

    The hook is that of the mode and alpha recorded in the baked output. Returns a
    :class:`~cosmic_bake.verify.logits.VerifyReport` (``.passed``, KL and logit figures, the relative
    gate against the unedited model, and the prompt-free weight-space check in ``.weights``); with
    ``output`` set, also writes it as a JSON report.
    """
    from cosmic_bake.outputs import check_target, write_report
    from cosmic_bake.verify.logits import add_weight_check
    from cosmic_bake.verify.runtime import verify_logits
    from cosmic_bake.verify.weights import weight_check

    s = _settings(VerifySettings, {"original": original, "baked": baked, "direction": direction}, options)
    paths = _inputs(s, inputs)
    if s.output is not None:
        check_target(s.output, force=s.force, inputs=paths, kind="json")
    d = baked_direction(s.direction, s.baked)
    texts = verify_prompts(s.prompts, s.column, s.limit)
    report = verify_logits(
        s.original,
        s.baked,
        d,
        texts,
        s.dtype,
        s.chat_template,
        s.system_prompt,
        s.batch_size,
        session,
        s.placement(),
    )
    report = add_weight_check(report, weight_check(s.original, s.baked, d))
    if s.output is not None:
        data = {"original": s.original, "baked": s.baked, "direction": str(s.direction), **report.to_dict()}
        write_report(
            s.output, {**data, "settings": s.record()}, force=s.force, inputs=paths, record_paths=s.record_paths
        )
    return report


def baked_direction(direction: str | os.PathLike, baked: str | os.PathLike):
    """The direction of a run folder with the mode and alpha a baked output recorded (the hook it equals)."""
    from cosmic_bake.artifacts import Direction, baked_settings

    d = Direction.load(direction)
    recorded = baked_settings(str(baked))
    return d if recorded is None else d.with_mode(*recorded)


def evaluate(model: Any = None, *, session: Session | None = None, inputs: Paths = (), **options):
    """Refusal rates on harmful and harmless prompts, and harmless first-token KL.

    KL is against the same model without the hook, or against ``kl_against`` (for a baked model).
    Options are :class:`~cosmic_bake.settings.EvalSettings`' fields. Returns the
    :class:`~cosmic_bake.verify.evaluate.EvalReport`; with ``output`` set, also writes it as JSON.
    """
    from cosmic_bake.outputs import check_target, write_report
    from cosmic_bake.verify.evaluate import evaluate as evaluate_model
    from cosmic_bake.verify.evaluate import first_token_logits, intervention_of

    s = _settings(EvalSettings, {"model": model}, options)
    session = session or Session()
    paths = _inputs(s, inputs)
    if s.output is not None:
        check_target(s.output, force=s.force, inputs=paths, kind="json")
    bad, good = s.eval_prompts()
    load = (s.dtype, s.chat_template, s.system_prompt)
    base_logits = None
    if s.kl_against is not None:
        ref, _, ref_fmt = session.load_for_eval(s.kl_against, s.runtime, "none", *load, placement=s.placement())
        base_logits = first_token_logits(ref, ref_fmt, good, _eval_batch(s.batch_size, ref))
        del ref
    lm, arch, fmt = session.load_for_eval(s.model, s.runtime, s.kind, *load, placement=s.placement())
    rep = evaluate_model(
        lm,
        arch,
        fmt,
        harmful=bad,
        harmless=good,
        intervention=intervention_of(s.kind, s.direction, s.alpha),
        max_new_tokens=s.max_new_tokens,
        batch_size=_eval_batch(s.batch_size, lm),
        base_logits=base_logits,
    )
    if s.output is not None:
        direction = str(s.direction) if s.direction else None
        data = {"model": s.model, "direction": direction, **rep.summary(), "completions": rep.completions}
        write_report(
            s.output, {**data, "settings": s.record()}, force=s.force, inputs=paths, record_paths=s.record_paths
        )
    return rep


def _eval_batch(batch_size: int | str, model) -> int:
    """Generation batches for ``model``: at most 32 prompts from a number; ``auto``: 32 on the CPU,
    more on an accelerator (halved on out-of-memory)."""
    from cosmic_bake.model.batching import generation_batch
    from cosmic_bake.model.devices import input_device

    return generation_batch(batch_size, input_device(model))


def sweep(model=None, direction=None, output=None, *, session: Session | None = None, inputs: Paths = (), **options):
    """Evaluate the baked form of a steering edit at each alpha; pick the safest within the harmless cap.

    Options are :class:`~cosmic_bake.settings.SweepSettings`' fields. Writes ``output`` (sweep.json,
    sweep.png, manifest.json) and returns the :class:`~cosmic_bake.select.sweep.Sweep`.
    """
    from cosmic_bake.artifacts import Direction, source_record
    from cosmic_bake.outputs import atomic_dir, check_target, manifest
    from cosmic_bake.select.sweep import sweep as sweep_alphas
    from cosmic_bake.select.sweep import write_sweep

    s = _settings(SweepSettings, {"model": model, "direction": direction, "output": output}, options)
    paths = _inputs(s, inputs)
    check_target(s.output, force=s.force, inputs=paths)
    d = Direction.load(s.direction)
    bad, good = s.eval_prompts()
    lm, arch, fmt = _load(session, s)
    result = sweep_alphas(
        lm.model,
        arch,
        fmt,
        d,
        mode=s.mode,
        alphas=list(s.alphas),
        harmful=bad,
        harmless=good,
        max_new_tokens=s.max_new_tokens,
        batch_size=_eval_batch(s.batch_size, lm.model),
        max_harmless_refusal=s.max_harmless_refusal,
    )
    with atomic_dir(s.output, force=s.force, inputs=paths) as tmp:
        write_sweep(result, tmp, f"{s.mode} sweep, {s.model}")
        extra = {"direction": d.record(), "sweep": result.to_dict(), "settings": s.record()}
        source = source_record(lm.source, s.record_paths)
        manifest(tmp, stage="sweep", source=source, extra=extra, record_paths=s.record_paths)
    return result


def compare(model: Any = None, output: Any = None, *, session: Session | None = None, inputs: Paths = (), **options):
    """Run COSMIC and the refusal-score selector on the same prompts and compare their directions.

    Options are :class:`~cosmic_bake.settings.CompareSettings`' fields. Writes ``output``
    (compare.json, compare.md, compare.png, one folder per direction) and returns the
    :class:`~cosmic_bake.select.compare.Comparison`.
    """
    from cosmic_bake.artifacts import source_record
    from cosmic_bake.outputs import atomic_dir, check_target, manifest
    from cosmic_bake.prompts.sets import load_prompts
    from cosmic_bake.select.compare import compare as compare_selectors
    from cosmic_bake.select.compare import write_comparison

    s = _settings(CompareSettings, {"model": model, "output": output}, options)
    paths = _inputs(s, inputs)
    check_target(s.output, force=s.force, inputs=paths)
    sets = s.prompt_sets()
    bad = load_prompts(s.eval_harmful, s.column, limit=s.limit_eval_harmful)
    good = load_prompts(s.eval_harmless, s.column, limit=s.limit_eval_harmless)
    lm, arch, fmt = _load(session, s)
    result = compare_selectors(lm, arch, fmt, sets, s, eval_harmful=bad, eval_harmless=good)
    with atomic_dir(s.output, force=s.force, inputs=paths) as tmp:
        write_comparison(result, tmp, compare_title(s))
        extra = {
            "comparison": result.to_dict(),
            "directions": {k: d.record() for k, d in result.directions.items()},
            "settings": s.record(),
        }
        source = source_record(lm.source, s.record_paths)
        manifest(tmp, stage="compare", source=source, extra=extra, record_paths=s.record_paths)
    return result


def compare_title(s: CompareSettings) -> str:
    return f"Selectors compared on {s.model}" + (" (system prompt set)" if s.system_prompt is not None else "")


def plan_push(folder: Any = None, repo_id: str | None = None, **options):
    """What ``push`` would upload (files and the card), as a :class:`~cosmic_bake.export.hub_push.PushPlan`."""
    from cosmic_bake.export.hub_push import plan_push as plan

    s = _settings(PushSettings, {"folder": folder, "repo_id": repo_id}, options)
    return plan(s.folder, include_gguf=not s.no_gguf)


def push(folder: Any = None, repo_id: str | None = None, **options) -> str | None:
    """Upload a bake or run folder to the Hub in one commit; returns its URL (None with ``dry_run``)."""
    from cosmic_bake.export.hub_push import push as upload

    s = _settings(PushSettings, {"folder": folder, "repo_id": repo_id}, options)
    if s.dry_run:
        return None
    message = f"Upload {s.folder.name} with cosmic-bake"
    return upload(plan_push(s), s.repo_id, private=s.private, revision=s.revision, message=message)
