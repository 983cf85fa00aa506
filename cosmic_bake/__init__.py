"""cosmic-bake: find a model's refusal direction with COSMIC and bake it into exported weights.

The data flow is select -> bake -> export -> verify; see the README for the tour.

Package layout (one package per stage; each imports only the ones before it, the command
line imports everything and nothing imports it):

- ``errors``, ``progress``, ``outputs`` (the output-safety rule, atomic writes, manifests), ``plots``
- ``math/`` (projections, directions, scores: pure tensor functions)
- ``model/`` (loading, builtin models, architecture probe, layout, chat format, forward, hooks, llama.cpp,
  session: models shared between calls)
- ``prompts/`` (``sets``: prompt files and builtin sets; ``presets``: system prompt presets)
- ``settings/`` (one frozen dataclass per command: every option's type, default, range and help, once)
- ``artifacts`` (the direction artifact and its provenance: model hash, source record, checks)
- ``export/`` (safetensors read / write, GGUF convert / hparams / io / vocab, ggml quant, LoRA, card, Hub push)
- ``verify/`` (logits, runtime, tolerances, reference, weights*, evaluate) and ``select/`` (candidates, scoring,
  selection, run_folder, sweep, compare)
- ``bake/`` (plan, apply, constant, folder, gguf_edit, gguf)
- ``api`` (one call per command, from options or a settings object), ``recipe/`` (file, runner: calls
  the api with one session), ``cli/`` (one module per command, options generated from the settings)
"""

from __future__ import annotations

__version__ = "0.2.0"
