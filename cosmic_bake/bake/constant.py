"""Where a constant added to the residual stream goes in a checkpoint (spec section 6, additive edits).

``add`` (ActAdd) and the bakeable ``affine`` (ACE, hook ``pin``) add a vector ``c`` at the input of
block ``l``. In weights that is:

* ``l == 0``: every row of the token embedding gets ``c / s`` (``s`` the scale the model applies
  to its embeddings, measured: 1, or ``sqrt(d)`` for Gemma).
* ``l > 0``: a bias ``c`` on block ``l - 1``'s MLP down projection, the last writer before block
  ``l``. Stock transformers and llama.cpp must load the result, so per architecture:

  ==========  ===========================================================================
  llama       ``mlp_bias: true`` (zero biases for gate/up/down, ``c`` on the down bias)
  qwen2       re-expressed as a Llama checkpoint (``LlamaForCausalLM``, ``attention_bias``
              true for its q/k/v biases, zero ``o_proj`` biases, ``mlp_bias`` true): the same
              function (both use rotate-half RoPE and RMSNorm), proven equal by ``verify``
  mistral     the same re-expression, when it has no sliding window
  others      refused: Gemma's post-MLP norm would rescale a bias, MoE down projections are
              per expert, Phi-3 has no bias switch; the message says to use ``l == 0`` or the hook
  ==========  ===========================================================================

Pure planning: no tensor data is read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.layout import Layout

LLAMA_LIKE = ("llama", "qwen2", "mistral")


@dataclass
class ConstantPlacement:
    """Where the constant goes and what else the checkpoint needs to carry it."""

    kind: str  # "embedding" | "bias"
    tensor: str  # on-disk name that receives the constant
    scale: float  # the constant is divided by this before it is stored
    config: dict  # config.json to write (maybe re-expressed as Llama with bias switches)
    new_tensors: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # zero biases: shape, dtype
    note: str = ""


def _needs(config: dict) -> set[str]:
    """Parameter names a model of ``config`` has (meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n for n, _ in model.named_parameters()}


def _llama_config(config: dict, attention_bias: bool) -> dict:
    out = dict(config)
    out.update(model_type="llama", architectures=["LlamaForCausalLM"], mlp_bias=True, attention_bias=attention_bias)
    for key in ("use_sliding_window", "sliding_window", "max_window_layers"):
        out.pop(key, None)
    return out


def place_constant(
    layout: Layout, on_disk: dict[str, tuple[tuple[int, ...], str]], config: dict, layer: int, embed_scale: float
) -> ConstantPlacement:
    """Plan where ``c`` (added at block ``layer``'s input) is stored; ``on_disk``: name -> (shape, dtype)."""
    if not 0 <= layer < layout.n_layers:
        raise CosmicBakeError(f"layer {layer} is out of range for a {layout.n_layers}-layer model", "check the run")
    if layer == 0:
        return ConstantPlacement(
            "embedding", layout.embed, embed_scale, dict(config), note="added to every embedding row"
        )
    block = layer - 1
    mlp = [(name, w) for name, w in layout.writers.items() if w.block == block and w.part == "mlp"]
    weights = [name for name, w in mlp if w.role == "weight"]
    why = None
    if (block, "mlp") in layout.post_norms:
        why = "a norm follows its MLP, which would rescale a bias"
    elif len({w.writer for _, w in mlp}) != 1 or len(weights) != 1 or len(on_disk.get(weights[0], ((),))[0]) != 2:
        why = "its MLP output is a mixture of experts, with no single bias to carry a constant"
    if why is None and layout.model_type not in LLAMA_LIKE:
        why = f"{layout.model_type} has no switch for MLP biases in stock transformers and llama.cpp"
    if why is None and layout.model_type == "mistral" and config.get("sliding_window") is not None:
        why = "Mistral with a sliding window cannot be re-expressed as Llama"
    if why is not None:
        raise CosmicBakeError(
            f"cannot bake a constant at the input of block {layer}: block {block}: {why}",
            "use the runtime hook (cosmic-bake eval --intervention ...), or a direction at layer 0",
        )
    bias = weights[0].removesuffix(".weight") + ".bias"
    if bias in on_disk:
        return ConstantPlacement("bias", bias, 1.0, dict(config), note=f"added to the existing {bias}")
    if layout.model_type == "llama":
        new_config = {**config, "mlp_bias": True}
        note = "mlp_bias switched on (zero biases) and the constant stored in " + bias
    else:
        new_config = _llama_config(config, attention_bias=any(n.endswith("q_proj.bias") for n in on_disk))
        note = f"{layout.model_type} re-expressed as LlamaForCausalLM with biases; the constant stored in {bias}"
    new = {}
    for name in sorted(_needs(new_config) - set(on_disk)):
        if name == layout.lm_head:
            continue
        if not name.endswith(".bias") or name.removesuffix(".bias") + ".weight" not in on_disk:
            raise CosmicBakeError(
                f"the re-expressed checkpoint needs {name}, which cannot be derived", "use the runtime hook instead"
            )
        shape, dtype = on_disk[name.removesuffix(".bias") + ".weight"]
        new[name] = ((shape[0],), dtype)
    if bias not in new:
        raise CosmicBakeError(f"the re-expressed checkpoint has no {bias}", "use the runtime hook instead")
    return ConstantPlacement("bias", bias, 1.0, new_config, new, note)
