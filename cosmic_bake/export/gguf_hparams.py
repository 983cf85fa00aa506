"""The hyperparameters a GGUF file carries, from a transformers checkpoint's ``config.json``.

:func:`read_hparams` reads them and checks what llama.cpp can represent (RoPE variants, sliding
windows); :func:`add_model_keys` writes them as the architecture's metadata keys (names from
gguf-py's ``GGUFWriter``). Used by :mod:`.gguf_convert`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from cosmic_bake.errors import CosmicBakeError, first_line
from cosmic_bake.export.ggml_quant import FILE_TYPES

# HF ``model_type`` -> llama.cpp architecture name (a value of gguf.MODEL_ARCH_NAMES).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2moe",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}


@dataclass(frozen=True)
class Hparams:
    """The config values the conversion needs, normalised across architectures."""

    model_type: str
    arch: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context: int
    rms_eps: float
    tied: bool
    n_experts: int
    config: Any  # the transformers PretrainedConfig


def read_hparams(folder: Path, warnings: list[str]) -> Hparams:
    """Read config.json (model_type first, so unsupported models fail with our message)."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CosmicBakeError(f"cannot read {path} ({first_line(err)})", "pass a transformers model folder") from err
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CosmicBakeError(
            f"GGUF export does not support model_type {model_type!r}",
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}; export with --format hf instead",
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CosmicBakeError(f"transformers cannot read {path} ({first_line(err)})", "fix config.json") from err
    n_heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    n_experts = int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)
    hp = Hparams(
        model_type=model_type,
        arch=SUPPORTED_MODEL_TYPES[model_type],
        n_layers=int(config.num_hidden_layers),
        hidden=hidden,
        intermediate=int(config.intermediate_size),
        n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // n_heads),
        context=int(config.max_position_embeddings),
        rms_eps=float(config.rms_norm_eps),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        n_experts=n_experts,
        config=config,
    )
    check_representable(hp, warnings)
    return hp


def rope_params(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """RoPE parameters (transformers 5 ``rope_parameters``; per layer type for Gemma 3)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), Mapping):
        params = dict(params[layer_type])
    elif any(isinstance(v, Mapping) for v in params.values()):
        params = dict(params.get("full_attention") or next(v for v in params.values() if isinstance(v, Mapping)))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def check_representable(hp: Hparams, warnings: list[str]) -> None:
    """Refuse configs llama.cpp would silently run differently; warn where it only matters at length."""
    config = hp.config
    fix = "export with --format hf instead"
    for layer_type in ("full_attention", "sliding_attention") if hp.model_type == "gemma3_text" else (None,):
        rope = rope_params(config, layer_type)
        if rope["rope_type"] not in ("default", "linear", "llama3") or (
            rope["rope_type"] == "llama3" and hp.arch != "llama"
        ):
            raise CosmicBakeError(f"GGUF export does not support rope_type {rope['rope_type']!r} yet", fix)
        if hp.model_type == "gemma3_text" and layer_type == "sliding_attention" and rope["rope_type"] != "default":
            raise CosmicBakeError("GGUF export: llama.cpp's Gemma 3 has no RoPE scaling on sliding layers", fix)
    if hp.model_type in ("gemma2", "gemma3_text"):
        # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models,
        # which it recognises by layer count; other query_pre_attn_scalar values cannot be expressed.
        big = hp.n_layers == (46 if hp.model_type == "gemma2" else 62)
        expected = hp.hidden // hp.n_heads if big else hp.head_dim
        scalar = getattr(config, "query_pre_attn_scalar", expected)
        if scalar != expected:
            raise CosmicBakeError(
                f"GGUF export: query_pre_attn_scalar {scalar} differs from the {expected} llama.cpp uses for "
                f"a {hp.n_layers}-layer {hp.model_type}",
                fix,
            )
        if hp.model_type == "gemma3_text" and getattr(config, "attn_logit_softcapping", None):
            raise CosmicBakeError("GGUF export: llama.cpp's Gemma 3 has no attention logit soft-capping", fix)
    if hp.model_type == "qwen2_moe":
        sparse_step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        if sparse_step != 1 or list(getattr(config, "mlp_only_layers", None) or []):
            raise CosmicBakeError(
                "GGUF export: llama.cpp's qwen2moe needs every layer sparse (no dense MLP layers)", fix
            )
        if getattr(config, "norm_topk_prob", False):
            raise CosmicBakeError("GGUF export: llama.cpp's qwen2moe does not renormalise top-k weights", fix)
    window = getattr(config, "sliding_window", None)
    uses_window = window and (hp.model_type != "qwen2" or getattr(config, "use_sliding_window", False))
    if uses_window and hp.model_type not in ("gemma2", "gemma3_text") and int(window) < hp.context:
        warnings.append(
            f"llama.cpp's {hp.arch} attends to the full context: sliding_window {window} is ignored, so outputs "
            f"differ from transformers beyond {window} tokens"
        )


def rope_dims(hp: Hparams) -> int:
    """How many dimensions of each head RoPE rotates (Phi-3 may rotate only a fraction)."""
    rope = rope_params(hp.config)
    partial = rope.get("partial_rotary_factor", getattr(hp.config, "partial_rotary_factor", None)) or 1.0
    return int(hp.head_dim * float(partial))


def llama3_rope_factors(rope: Mapping[str, Any], dims: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling as llama.cpp takes it: one divisor per rotated frequency.

    HF rescales each inverse frequency in place (long wavelengths divided by ``factor``, short ones
    kept, a smooth blend between); llama.cpp instead divides each angle by a ``rope_freqs`` entry,
    so the entry is the ratio of the original inverse frequency to HF's rescaled one.
    """
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / float(rope["rope_theta"]) ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return (inv_freq / scaled).float()


def add_model_keys(writer: gguf.GGUFWriter, hp: Hparams, vocab_name: str, outtype: str, n_vocab: int) -> None:
    """Hyperparameter keys llama.cpp reads for ``hp.arch`` (names from gguf-py's GGUFWriter)."""
    config = hp.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(vocab_name)
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(hp.context)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.intermediate)
    writer.add_head_count(hp.n_heads)
    writer.add_head_count_kv(hp.n_kv_heads)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_layer_norm_rms_eps(hp.rms_eps)

    rope = rope_params(config)
    writer.add_rope_dimension_count(rope_dims(hp))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))

    if hp.n_experts:
        writer.add_expert_count(hp.n_experts)
        writer.add_expert_used_count(int(config.num_experts_per_tok))
    if hp.model_type == "qwen2_moe":
        writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        writer.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    if hp.model_type in ("gemma2", "gemma3_text"):
        # Per-layer SWA flags, so llama.cpp follows config.layer_types rather than its built-in period.
        layer_types = list(getattr(config, "layer_types", None) or [])
        if len(layer_types) != hp.n_layers:
            raise CosmicBakeError("config.json: layer_types does not list every layer", "re-download the model")
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if hp.model_type == "gemma2" and getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if hp.model_type == "gemma3_text":
        writer.add_rope_freq_base_swa(float(rope_params(config, "sliding_attention")["rope_theta"]))
