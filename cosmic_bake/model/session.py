"""The models one command, or one recipe run, works with.

A recipe's steps (select, verify, the evaluations) all need the source model; loading it once per
run instead of once per step saves a load and a conversion each time (minutes for a GGUF source
on the CPU). A :class:`Session` keeps the models whose specs are *pinned* loaded until it closes;
every other model (a baked export) is loaded fresh for its step and freed with it, so a run peaks
at the source plus one export, as ``verify`` does on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from cosmic_bake.errors import CosmicBakeError

if TYPE_CHECKING:
    from cosmic_bake.model.architecture import Architecture
    from cosmic_bake.model.chat import ChatFormat
    from cosmic_bake.model.devices import Placement
    from cosmic_bake.model.loading import LoadedModel

LLAMACPP_EVAL_CTX = 2048  # prompt + new tokens per sequence in llama.cpp eval


class Session:
    """Loads models for hooks; keeps pinned ones loaded between calls (see the module docstring)."""

    def __init__(self, pin: Iterable[str] = (), echo: Callable[[str], None] | None = None) -> None:
        self.pinned = set(pin)
        self.echo = echo or (lambda _message: None)
        self._models: dict[tuple[str, str, Placement | None], tuple[LoadedModel, Architecture]] = {}

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Forget every kept model (memory is freed once no caller holds one)."""
        self._models.clear()

    def load(
        self,
        spec: str,
        dtype: str = "float32",
        chat_template: str | None = None,
        system_prompt: str | None = None,
        placement: Placement | None = None,
        loader: Callable[..., LoadedModel] | None = None,
    ) -> tuple[LoadedModel, Architecture, ChatFormat]:
        """``(LoadedModel, Architecture, ChatFormat)`` for a Hub id, folder, .gguf file or builtin name.

        ``chat_template`` is a Jinja template or a format string (or a file holding one);
        ``system_prompt`` (text) replaces the template's default system prompt. The chat format is
        built per call, so steps with different templates share one loaded model. ``placement``
        (device, or accelerate's device map / offload) is part of what a kept model is found by.
        ``loader`` (``load_model``'s signature) loads a model not kept yet: verify's widens a 16-bit
        checkpoint without holding the stored copy (:func:`cosmic_bake.verify.widen.load_widened`).
        """
        from cosmic_bake.model.architecture import probe
        from cosmic_bake.model.chat import ChatFormat, read_template_option
        from cosmic_bake.model.loading import load_model

        key = (str(spec), dtype, placement)
        if key in self._models:
            lm, arch = self._models[key]
        else:
            t = time.perf_counter()
            lm = (loader or load_model)(spec, dtype=dtype, placement=placement)
            arch = probe(lm.model)
            self.echo(
                f"loaded {spec} ({arch.model_type}, {arch.n_layers} layers, d={arch.d_model}, "
                f"{'tied' if arch.tied else 'untied'} embeddings) in {time.perf_counter() - t:.1f}s"
            )
            if str(spec) in self.pinned:
                self._models[key] = (lm, arch)
        return lm, arch, ChatFormat(lm.tokenizer, read_template_option(chat_template), system_prompt)

    def load_for_eval(
        self,
        spec: str,
        runtime: str,
        kind: str,
        dtype: str = "float32",
        chat_template: str | None = None,
        system_prompt: str | None = None,
        placement: Placement | None = None,
    ):
        """(model, arch, fmt): a transformers model with its probe, or a llama.cpp model (arch None).

        ``runtime`` auto picks llama.cpp for a GGUF file evaluated without a hook (``kind`` none).
        """
        from cosmic_bake.model.loading import load_tokenizer, resolve

        source = resolve(spec)
        use_llamacpp = runtime == "llama.cpp" or (runtime == "auto" and source.kind == "gguf" and kind == "none")
        if not use_llamacpp:
            lm, arch, fmt = self.load(spec, dtype, chat_template, system_prompt, placement)
            return lm.model, arch, fmt
        if source.kind != "gguf":
            raise CosmicBakeError(f"--runtime llama.cpp needs a .gguf model, not {spec}", "pass a GGUF file")
        if kind != "none":
            raise CosmicBakeError(
                "hooks run in transformers only",
                "drop --runtime llama.cpp, or evaluate a baked GGUF without --direction",
            )
        from cosmic_bake.model.chat import ChatFormat, read_template_option
        from cosmic_bake.model.llamacpp import LlamaCppModel

        t = time.perf_counter()
        fmt = ChatFormat(load_tokenizer(source), read_template_option(chat_template), system_prompt)
        llm = LlamaCppModel(source.path, n_ctx=LLAMACPP_EVAL_CTX)
        self.echo(f"loaded {spec} in llama.cpp in {time.perf_counter() - t:.1f}s")
        return llm, None, fmt
