"""cosmic-bake: find a model's refusal direction with COSMIC and bake it into exported weights.

The data flow is select -> bake -> export -> verify; see the README for the tour.

Package layout (one package per stage; each imports only the ones before it, the command
line imports everything and nothing imports it):

- ``errors``, ``progress``, ``outputs`` (the output-safety rule, atomic writes, manifests), ``plots``
- ``math/`` (projections, directions, scores: pure tensor functions)
- ``model/`` (loading, builtin models, architecture probe, layout, chat format, forward, hooks, llama.cpp)
- ``prompts/`` (``sets``: prompt files and builtin sets; ``presets``: system prompt presets)
- ``artifacts`` (the direction artifact and its provenance: model hash, source record, checks)
- ``export/`` (safetensors read / write, GGUF convert / hparams / io / vocab, ggml quant, LoRA, card, Hub push)
- ``verify/`` (logits, tolerances, reference, weights*, evaluate) and ``select/`` (candidates, scoring,
  selection, run_folder, sweep, compare)
- ``bake/`` (plan, apply, constant, folder, gguf_edit, gguf)
- ``api`` (one call per stage), ``recipe/`` (file, runner), ``cli/`` (one module per command)
"""

from __future__ import annotations

__version__ = "0.1.0"
