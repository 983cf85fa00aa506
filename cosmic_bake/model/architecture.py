"""Where each architecture keeps its layers, residual writers, post-writer norms and head.

Found from the module structure and one tiny traced forward pass, not from a table of model
names: the decoder layers are the ``ModuleList`` of ``num_hidden_layers`` blocks; inside a block,
the order in which its direct children run tells attention, MLP and the norms apart. A norm that
runs after a writer and before the next writer's own pre-norm (Gemma 2/3 "sandwich" norms) is a
post-writer norm. The norm gain convention (``w`` or Gemma's ``1 + w``) is measured numerically.

Supported and tested: Llama, Qwen2, Mistral, Gemma 2, Gemma 3 (text), Phi-3, Mixtral, Qwen2-MoE.
Anything else that fits the same shape works too; anything that does not gets an error saying
which part was not found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.devices import cpu_param, input_device, loaded_on_cpu, module_device

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe")

_MLP_HINTS = ("mlp", "moe", "feed_forward", "ffn", "experts")
_DOWN_HINTS = ("down", "w2")


@dataclass
class Writer:
    """A parameter whose output is added to the residual stream.

    ``param`` is the parameter name inside ``module`` (``"weight"`` for a Linear, ``"down_proj"``
    for fused expert tensors of shape ``[experts, d_model, ffn]``). ``bias`` names the bias, if any.
    """

    name: str
    module: nn.Module
    param: str
    bias: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)


@dataclass
class BlockParts:
    """One decoder block: its attention and MLP modules, their writers and post-writer norms."""

    index: int
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    attn_writers: list[Writer]
    mlp_writers: list[Writer]
    attn_post_norm: nn.Module | None = None
    mlp_post_norm: nn.Module | None = None


@dataclass
class Architecture:
    """The parts of a causal LM that selection, hooks and baking need."""

    model_type: str
    d_model: int
    layers: nn.ModuleList
    blocks: list[BlockParts]
    embed: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Module
    tied: bool
    gain_offset: float  # 1.0 for Gemma-style norms (gain = 1 + weight), else 0.0
    names: dict[int, str] = field(default_factory=dict)  # id(module) -> qualified name

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def name_of(self, module: nn.Module) -> str:
        return self.names[id(module)]

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """The vector ``g`` a norm multiplies by, in float64 on the CPU (read from the offload map if offloaded)."""
        return cpu_param(norm).double() + self.gain_offset

    @property
    def has_post_norms(self) -> bool:
        return any(b.attn_post_norm is not None or b.mlp_post_norm is not None for b in self.blocks)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and hasattr(module, "weight")


def _find_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            if best is None or name.count(".") < best[0].count("."):
                best = (name, module)
    if best is None:
        raise CosmicBakeError(
            f"no list of {n_layers} decoder layers found in {type(model).__name__}",
            "this model family is not supported; see the README's architecture table",
        )
    return best


def _trace(model: nn.Module, vocab: int) -> list[str]:
    """Qualified names of all submodules of ``model`` in the order they first run.

    One two-token forward pass; hooks only record, so this works for any architecture.
    """
    order: list[str] = []
    handles = [
        mod.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n))
        for name, mod in model.named_modules()
        if name
    ]
    ids = torch.tensor([[min(1, vocab - 1), min(2, vocab - 1)]], device=input_device(model))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def _relative(order: list[str], prefix: str) -> list[str]:
    """Entries of ``order`` under ``prefix``, with the prefix stripped."""
    cut = len(prefix) + 1
    return [n[cut:] for n in order if n.startswith(prefix + ".")]


def _gain_offset(norm: nn.Module, d_model: int) -> float:
    """0 when the norm multiplies by ``w``, 1 when by ``1 + w`` (Gemma), measured on one vector."""
    x = torch.linspace(-1.0, 1.0, d_model).reshape(1, 1, d_model) + 0.1
    w = cpu_param(norm)
    with torch.no_grad(), loaded_on_cpu(norm):  # an offloaded norm runs on the CPU, others where they are
        y = norm(x.to(device=module_device(norm), dtype=w.dtype)).to("cpu").double().flatten()
        xn = x.double().flatten() / x.double().pow(2).mean().add(getattr(norm, "eps", 1e-6)).sqrt()
        w = w.double()
        plain = (y - xn * w).abs().max()
        gemma = (y - xn * (1 + w)).abs().max()
    return 1.0 if gemma < plain else 0.0


def _writers(scope: nn.Module, scope_name: str, order: list[str], d_model: int, prefix: str) -> list[Writer]:
    """Modules in ``scope`` that write ``d_model``-wide outputs into the stream.

    For each module holding Linears, the last one it runs with ``out_features == d_model`` is its
    writer (``o_proj`` after ``q/k/v``, ``down_proj`` after ``gate/up``, a shared expert's
    ``down_proj``). Fused expert tensors ``[experts, d_model, ffn]`` named like a down projection
    are writers too.
    """
    rank = {n: i for i, n in enumerate(order)}
    last_by_parent: dict[str, tuple[int, str, nn.Linear]] = {}
    writers: list[Writer] = []
    for name, mod in scope.named_modules():
        rel = f"{scope_name}.{name}" if name else scope_name
        if isinstance(mod, nn.Linear) and mod.out_features == d_model and rel in rank:
            parent = rel.rsplit(".", 1)[0]
            if parent not in last_by_parent or rank[rel] > last_by_parent[parent][0]:
                last_by_parent[parent] = (rank[rel], rel, mod)
        for pname, param in mod.named_parameters(recurse=False):
            if param.ndim == 3 and param.shape[-2] == d_model and any(h in pname.lower() for h in _DOWN_HINTS):
                bias = next(
                    (b for b, t in mod.named_parameters(recurse=False) if t.ndim == 2 and pname in b and b != pname),
                    None,
                )
                writers.append(Writer(f"{prefix}.{rel}", mod, pname, bias))
    for _, rel, mod in sorted(last_by_parent.values(), key=lambda t: t[0]):
        writers.append(Writer(f"{prefix}.{rel}", mod, "weight", "bias" if mod.bias is not None else None))
    return writers


def probe(model: nn.Module) -> Architecture:
    """Describe ``model`` (a transformers causal LM) or raise naming what could not be found."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(getattr(text_config, "num_hidden_layers", 0) or 0)
    d_model = int(getattr(text_config, "hidden_size", 0) or 0)
    if n_layers <= 0 or d_model <= 0:
        raise CosmicBakeError(
            f"config of {type(model).__name__} has no num_hidden_layers / hidden_size",
            "only decoder-only causal language models are supported",
        )
    names = {id(m): n for n, m in model.named_modules()}
    _, layers = _find_layers(model, n_layers)
    embed = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    if embed is None or lm_head is None:
        raise CosmicBakeError(
            f"{type(model).__name__} exposes no input or output embedding",
            "only causal language models with a token embedding and an LM head are supported",
        )
    trace = _trace(model, embed.weight.shape[0])
    blocks: list[BlockParts] = []
    for index, block in enumerate(layers):
        children = dict(block.named_children())
        attn = next(
            (m for n, m in children.items() if "attention" in type(m).__name__.lower() or n in ("self_attn", "attn")),
            None,
        )
        mlp = next(
            (
                m
                for n, m in children.items()
                if m is not attn and any(h in n.lower() or h in type(m).__name__.lower() for h in _MLP_HINTS)
            ),
            None,
        )
        missing = [what for what, mod in (("attention", attn), ("MLP", mlp)) if mod is None]
        if missing:
            raise CosmicBakeError(
                f"decoder layer {index} ({type(block).__name__}) has no {' or '.join(missing)} module",
                "this model family is not supported; see the README's architecture table",
            )
        prefix = names[id(block)]
        order = _relative(trace, prefix)
        seq = [children[n] for n in order if n in children]
        attn_post, mlp_post = _post_norms(seq, attn, mlp)
        attn_name = next(n for n, m in children.items() if m is attn)
        mlp_name = next(n for n, m in children.items() if m is mlp)
        attn_writers = _writers(attn, attn_name, order, d_model, prefix)
        mlp_writers = _writers(mlp, mlp_name, order, d_model, prefix)
        if not attn_writers or not mlp_writers:
            raise CosmicBakeError(
                f"{prefix}: could not find the {'attention output' if not attn_writers else 'MLP down'} projection",
                "this model family is not supported; see the README's architecture table",
            )
        blocks.append(BlockParts(index, block, attn, mlp, attn_writers, mlp_writers, attn_post, mlp_post))
    final_norm = _final_norm(model, layers, names, trace)
    tied = bool(getattr(text_config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))) or (
        _same_storage(lm_head.weight, embed.weight)
    )
    norm_for_gain = blocks[0].block.input_layernorm if hasattr(blocks[0].block, "input_layernorm") else final_norm
    return Architecture(
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        d_model=d_model,
        layers=layers,
        blocks=blocks,
        embed=embed,
        final_norm=final_norm,
        lm_head=lm_head,
        tied=tied,
        gain_offset=_gain_offset(norm_for_gain, d_model),
        names=names,
    )


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two weights are one (tied); offloaded weights live on ``meta``, where every pointer is 0."""
    if a is b:
        return True
    return a.device.type != "meta" and a.device == b.device and a.data_ptr() == b.data_ptr()


def _post_norms(seq: list[nn.Module], attn: nn.Module, mlp: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """Find norms that run after a writer and are not the next writer's pre-norm."""

    def after(writer: nn.Module, next_writer: nn.Module | None) -> nn.Module | None:
        idx = next((i for i, m in enumerate(seq) if m is writer), None)
        if idx is None:
            return None
        norms = []
        for m in seq[idx + 1 :]:
            if m is next_writer:
                break
            if _is_norm(m):
                norms.append(m)
        if next_writer is not None:
            norms = norms[:-1]  # the last one feeds the next writer
        return norms[0] if norms else None

    attn_first = next((m for m in seq if m is attn or m is mlp), attn) is attn
    if attn_first:
        return after(attn, mlp), after(mlp, None)
    return after(attn, None), after(mlp, attn)


def _final_norm(model: nn.Module, layers: nn.ModuleList, names: dict[int, str], trace: list[str]) -> nn.Module:
    """The first norm that runs after the last decoder layer (before the head)."""
    last = names[id(layers[-1])]
    modules = dict(model.named_modules())
    idx = max(i for i, n in enumerate(trace) if n == last or n.startswith(last + "."))
    for name in trace[idx + 1 :]:
        if _is_norm(modules[name]):
            return modules[name]
    raise CosmicBakeError(
        f"no final norm found after the last layer of {type(model).__name__}",
        "this model family is not supported; see the README's architecture table",
    )


@torch.no_grad()
def embed_scale(model: nn.Module, embed: nn.Embedding, first_block: nn.Module) -> float:
    """What the model multiplies its embedding rows by before block 0 (1, or ``sqrt(d)`` for Gemma).

    Measured with one forward pass (stopped at ``first_block``'s input) rather than read from a
    table, so an added constant stored in the embedding (baked ``add`` / ``affine`` at layer 0) is
    divided by exactly the right number. The number is the one ``model``'s dtype gives: Gemma
    casts ``sqrt(d)`` to it, so measure on a float32 model for a float32 runtime (see
    :func:`cosmic_bake.model.layout.model_layout`).
    """
    seen: list[torch.Tensor] = []

    def grab(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        raise _Seen

    ids = torch.tensor([[1, 2, 3]]) % max(1, embed.weight.shape[0])
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids.to(input_device(model)), use_cache=False)
    except _Seen:
        pass
    finally:
        handle.remove()
    rows = cpu_param(embed)[ids[0]].double()
    x = seen[0][0].to("cpu").double()
    return float((x * rows).sum() / (rows * rows).sum())


class _Seen(Exception):
    """Stops the measuring forward pass at block 0."""


def sliding_window(model: nn.Module) -> int | None:
    """The smallest sliding attention window any layer uses (None: every layer attends to everything).

    Qwen2 configs carry a window they do not use (``use_sliding_window`` False); Gemma 2/3 list
    their layer kinds; Mistral and Phi-3 apply ``sliding_window`` whenever it is set.
    """
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and not any("sliding" in str(k) for k in kinds):
        return None
    return int(window)
