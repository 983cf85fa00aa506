"""Run a baked output in its runtime beside the original with the hook it equals (``verify``'s logit half).

By the output's kind: a transformers folder and a PEFT LoRA folder run in transformers, a GGUF
(and a llama.cpp adapter on its base GGUF) in llama.cpp, each next to the unedited model stored
the same way (the relative gate and the runtime floor of :mod:`cosmic_bake.verify.logits`).

One model in memory at a time: the original is loaded and run first (hooked, and plain), its
logits spooled to disk (:mod:`cosmic_bake.verify.passes`); then it is let go and the baked side is
loaded, one llama.cpp model open at a time. Standalone, the peak is one model plus a batch of
logits, not the sum. A :class:`~cosmic_bake.model.session.Session` that pins the original (a
recipe run) keeps it loaded anyway: that run peaks at the source plus one export, as before.
A checkpoint stored in a 16-bit type and verified in float32 on the CPU is widened without
holding the stored copy too (:mod:`cosmic_bake.verify.widen`).
"""

from __future__ import annotations

import gc
from pathlib import Path

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.session import Session
from cosmic_bake.verify.logits import VerifyReport, compare, compare_gguf, record, record_for_gguf
from cosmic_bake.verify.widen import load_widened


def _free() -> None:
    """Collect, once the caller has dropped its names for a model, so its memory is returned now."""
    from cosmic_bake.model.batching import release_memory

    gc.collect()
    release_memory()


def verify_logits(
    original, baked, d, texts, dtype, chat_template, system_prompt, batch_size, session=None, placement=None
) -> VerifyReport:
    """The logit comparison of :func:`cosmic_bake.api.verify`, by the baked output's kind.

    ``placement`` applies to both transformers models; ``batch_size`` ``"auto"`` starts at 128 on an
    accelerator (8 on the CPU), and out of memory halves it (in the original's pass and in the
    baked model's, separately).
    """
    from cosmic_bake.model.batching import resolve_batch_size, with_backoff
    from cosmic_bake.model.devices import input_device

    baked = Path(baked)
    load = (session or Session()).load
    if baked.suffix.lower() == ".gguf":
        return _verify_gguf(
            load(original, dtype, chat_template, system_prompt, placement=placement, loader=load_widened),
            original,
            baked,
            d,
            texts,
        )
    a, arch, fmt = load(original, dtype, chat_template, system_prompt, placement=placement, loader=load_widened)
    start = resolve_batch_size(batch_size, input_device(a.model), 8)
    rec, size = _record(a.model, arch, d, texts, fmt, start)
    try:
        del a, arch
        _free()
        if baked.is_dir() and (baked / "adapter_config.json").is_file():  # a LoRA folder: base + PEFT adapter
            from cosmic_bake.export.lora import check_peft

            base = load_widened(original, dtype, placement).model
            check_peft(base)  # before importing peft: an old one may not even import
            from peft import PeftModel

            model, stored = PeftModel.from_pretrained(base, str(baked)).eval(), ""
            del base
        else:
            from cosmic_bake.verify.tolerances import stored_dtype

            stored = stored_dtype(baked)
            model = load_widened(str(baked), dtype, placement).model
        return with_backoff(lambda n: compare(rec, model, stored=stored, rows=n), size)[0]
    finally:
        rec.close()


def _record(model, arch, d, texts, fmt, start: int):
    """``(OriginalPass, batch size)``: the original's pass, with half the batch on out-of-memory.

    A function of its own, so that no frame still holds the model once the caller lets it go.
    """
    from cosmic_bake.model.batching import with_backoff

    return with_backoff(lambda n: record(model, arch, d, texts, fmt, n), start)


def is_adapter(path: Path) -> bool:
    """Whether a .gguf file is a llama.cpp LoRA adapter rather than a model."""
    from cosmic_bake.export.gguf_io import read_metadata

    return read_metadata(path, "general.type").get("general.type") == "adapter"


def _verify_gguf(loaded: tuple, original: str, baked: Path, d, texts) -> VerifyReport:
    """Run the baked GGUF in llama.cpp, and the unedited model stored the same way (relative gate, floor).

    A llama.cpp LoRA adapter is run on the base GGUF, which is then the unedited reference itself.
    ``loaded`` is the original as ``Session.load`` gives it; this function holds the only reference
    to it (unless a session pins it), lets it go after its pass, and then opens the two llama.cpp
    models one after the other.
    """
    from cosmic_bake.model.llamacpp import LlamaCppModel
    from cosmic_bake.verify.reference import unedited_gguf

    a, arch, fmt = loaded
    del loaded
    lora = baked if is_adapter(baked) else None
    source = a.source
    if lora is not None and source.kind != "gguf":
        raise CosmicBakeError(
            f"{baked.name} is a llama.cpp LoRA adapter; it needs a GGUF base",
            "pass the base model's .gguf file as ORIGINAL",
        )
    rec = record_for_gguf(a.model, arch, d, texts, fmt, plain=True)
    try:
        del a, arch
        _free()
        if lora is not None:  # the adapter on the base: the base itself is the unedited reference
            model_file, reference = source.path, source.path
            record_ = {"kind": "base GGUF without the adapter", "file": source.path.name}
        else:
            model_file = baked
            reference, record_ = unedited_gguf(original, source, baked)
        longest = max(int(b["input_ids"].shape[1]) for b in rec.batches)
        n_ctx = max(64, longest + 8)
        return compare_gguf(
            rec,
            lambda: LlamaCppModel(model_file, n_ctx=n_ctx, all_logits=True, lora=lora),
            True,
            unedited=lambda: LlamaCppModel(reference, n_ctx=n_ctx, all_logits=True),
            unedited_reference=record_,
        )
    finally:
        rec.close()
