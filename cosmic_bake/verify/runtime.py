"""Run a baked output in its runtime beside the original with the hook it equals (``verify``'s logit half).

By the output's kind: a transformers folder and a PEFT LoRA folder run in transformers, a GGUF
(and a llama.cpp adapter on its base GGUF) in llama.cpp, each next to the unedited model stored
the same way (the relative gate and the runtime floor of :mod:`cosmic_bake.verify.logits`).
"""

from __future__ import annotations

from pathlib import Path

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.session import Session


def verify_logits(
    original, baked, d, texts, dtype, chat_template, system_prompt, batch_size, session=None, placement=None
):
    """The logit comparison of :func:`verify`, by the baked output's kind.

    ``placement`` applies to both transformers models; ``batch_size`` ``"auto"`` starts at 128 on an
    accelerator (8 on the CPU), and out of memory halves it.
    """
    from cosmic_bake.model.batching import resolve_batch_size
    from cosmic_bake.model.devices import input_device

    a, arch, fmt = (session or Session()).load(original, dtype, chat_template, system_prompt, placement=placement)
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
