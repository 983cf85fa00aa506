"""Map a checkpoint's tensors to the architecture's residual writers, post-writer norms and embeddings.

:func:`model_layout` says which parameters are writers, post-writer norms and embeddings, by
in-memory name, for every layer. Found by :func:`~cosmic_bake.model.architecture.probe` on a
*real but small* instance of the same config, not from a table of model names: probe needs one
traced forward pass (meta tensors cannot run MoE routing or measure the norm gain convention),
and a full real instance would cost as much memory as the model. So the full model is built on
the meta device (free) to get every layer's structure, and a real model with a 32-token
vocabulary and only as many layers as it takes to see every distinct layer structure (usually
one) is probed. On-disk names are mapped to in-memory ones with transformers' own checkpoint
conversion rules (``rename_source_key``), which is how Mixtral's
``block_sparse_moe.experts.N.w2.weight`` on disk is known to be a slice of the fused in-memory
``mlp.experts.down_proj``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cosmic_bake.errors import CosmicBakeError

_PROBE_VOCAB = 32


@dataclass(frozen=True)
class WriterParam:
    """A writer's weight or bias: where it writes (block, ``attn``/``mlp``) and what it is."""

    block: int
    part: str  # "attn" | "mlp"
    writer: str  # in-memory module name, e.g. model.layers.3.mlp.experts
    role: str  # "weight" | "bias"


@dataclass
class Layout:
    """Where the residual writers of a model are, by in-memory parameter name, for every layer."""

    model_type: str
    d_model: int
    n_layers: int
    tied: bool
    gain_offset: float  # 1.0 for Gemma-style norms (gain = 1 + weight)
    embed_scale: float  # what embedding rows are multiplied by before block 0, in float32 (Gemma: sqrt(d))
    embed: str  # token embedding weight
    extra_embeds: list[str]  # additive position / token-type embeddings
    lm_head: str
    writers: dict[str, WriterParam]
    post_norms: dict[tuple[int, str], str]  # (block, part) -> norm weight
    memory_name: Callable[[str], str] = field(repr=False)  # on-disk tensor name -> in-memory name


def text_config(config):
    """The text part of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _skeleton(config) -> torch.nn.Module:
    """The full model on the meta device: every module and shape, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _signature(layer: torch.nn.Module) -> tuple:
    """What makes two decoder layers structurally the same: module types, parameter names and shapes."""
    modules = tuple((n, type(m).__name__) for n, m in layer.named_modules())
    params = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())
    return modules, params


def _small_model(config, n_layers: int) -> torch.nn.Module:
    """A real model of ``config`` with ``n_layers`` layers and a tiny vocabulary, for probing.

    Per-layer lists in the config (``layer_types`` and the like) are cut to the new length. The
    global RNG is left untouched.
    """
    from transformers import AutoModelForCausalLM

    small = copy.deepcopy(config)
    text = text_config(small)
    full = int(text.num_hidden_layers)
    for key, value in list(vars(text).items()):
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == full:
            setattr(text, key, type(value)(value[:n_layers]))
    text.num_hidden_layers = n_layers
    text.vocab_size = _PROBE_VOCAB
    if isinstance(getattr(text, "pad_token_id", None), int) and text.pad_token_id >= _PROBE_VOCAB:
        text.pad_token_id = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(small, dtype=torch.bfloat16).eval()


def _float32_embed_scale(small: torch.nn.Module, arch) -> float:
    """The embedding scale as a float32 run of the model applies it (Gemma: float32(sqrt(d))).

    The probe ``small`` is bfloat16 (memory), and Gemma builds its ``embed_scale`` buffer as
    ``sqrt(d)`` in the construction dtype and multiplies in the weight's dtype, so measured there
    it is bf16(sqrt(d)): 34.0 instead of 33.94 at d = 1152, and a layer-0 constant stored as
    ``c / 34`` comes out as 0.998 c. The hook, ``verify`` and transformers loads here run in
    float32 (``load_model``'s default) and llama.cpp scales by ``sqrtf(n_embd)``, also float32;
    in a bfloat16 run the stored rows are themselves rounded to 2^-9, so float32 is the number to
    divide by. So this twin of ``small`` is built in float32 with every parameter on the meta
    device (buffers real, made in float32), and only the parameters outside the decoder layers
    are made real, copied from ``small``: the measuring pass stops at block 0's input, so the
    layers cost no memory.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from cosmic_bake.model.architecture import embed_scale

    layers = arch.name_of(arch.layers)
    with init_empty_weights(include_buffers=False), torch.random.fork_rng(devices=[]):
        twin = AutoModelForCausalLM.from_config(copy.deepcopy(small.config), dtype=torch.float32).eval()
    values = dict(small.named_parameters(remove_duplicate=False))
    for name, _ in list(twin.named_parameters(remove_duplicate=False)):
        if name.startswith(layers + ".") or name not in values:
            continue
        owner, _, attr = name.rpartition(".")
        module = twin.get_submodule(owner)
        module._parameters[attr] = torch.nn.Parameter(values[name].detach().float().clone(), requires_grad=False)
    embed = twin.get_submodule(arch.name_of(arch.embed))
    return embed_scale(twin, embed, twin.get_submodule(f"{layers}.0"))


def _name_mapper(skeleton: torch.nn.Module) -> Callable[[str], str]:
    """On-disk tensor name -> in-memory parameter name, by transformers' own loading rules."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(skeleton)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta_state = dict.fromkeys(skeleton.state_dict(), True)
    prefix = skeleton.base_model_prefix

    def memory_name(disk_name: str) -> str:
        return rename_source_key(disk_name, renamings, converters, prefix, meta_state)[0]

    return memory_name


def model_layout(config) -> Layout:
    """Find writers, post-writer norms and embeddings of ``config``'s model for every layer.

    See the module docstring for why a meta skeleton plus a small real instance is probed.
    """
    from cosmic_bake.model.architecture import _find_layers, probe

    text = text_config(config)
    n_layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    skeleton = _skeleton(config)
    layers_name, layers = _find_layers(skeleton, n_layers)
    signatures = [_signature(layer) for layer in layers]
    first: dict[tuple, int] = {}
    for i, sig in enumerate(signatures):
        first.setdefault(sig, i)
    k = max(first.values()) + 1
    small = _small_model(config, k)
    arch = probe(small)
    small_layers = arch.name_of(arch.layers)
    if small_layers != layers_name or [_signature(b.block) for b in arch.blocks] != signatures[:k]:
        raise CosmicBakeError(
            f"the probe model of {arch.model_type} does not match its full configuration",
            "this model family is not supported for baking; see the README's architecture table",
        )
    layout = Layout(
        model_type=arch.model_type,
        d_model=arch.d_model,
        n_layers=n_layers,
        tied=arch.tied,
        gain_offset=arch.gain_offset,
        embed_scale=_float32_embed_scale(small, arch),
        embed=arch.name_of(arch.embed) + ".weight",
        extra_embeds=_extra_embeddings(small, arch),
        lm_head=arch.name_of(arch.lm_head) + ".weight",
        writers={},
        post_norms={},
        memory_name=_name_mapper(skeleton),
    )
    for i, sig in enumerate(signatures):
        _add_block(layout, arch, first[sig], i, layers_name)
    return layout


def _add_block(layout: Layout, arch, twin: int, index: int, layers_name: str) -> None:
    """Record block ``index``'s writers and post-norms, read off its probed twin block ``twin``."""
    src, dst = f"{layers_name}.{twin}.", f"{layers_name}.{index}."

    def moved(name: str) -> str:
        return dst + name.removeprefix(src)

    parts = arch.blocks[twin]
    for part, writers, norm in (
        ("attn", parts.attn_writers, parts.attn_post_norm),
        ("mlp", parts.mlp_writers, parts.mlp_post_norm),
    ):
        for w in writers:
            module = moved(w.name)
            layout.writers[f"{module}.{w.param}"] = WriterParam(index, part, module, "weight")
            if w.bias is not None:
                layout.writers[f"{module}.{w.bias}"] = WriterParam(index, part, module, "bias")
        if norm is not None:
            layout.post_norms[(index, part)] = moved(arch.name_of(norm)) + ".weight"


def _extra_embeddings(model: torch.nn.Module, arch) -> list[str]:
    """Additive embeddings besides the token embedding (learned positions, token types)."""
    inside = arch.name_of(arch.layers)
    return [
        f"{name}.weight"
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Embedding)
        and mod is not arch.embed
        and mod.embedding_dim == arch.d_model
        and not name.startswith(inside + ".")
    ]
