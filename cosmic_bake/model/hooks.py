"""Runtime interventions (spec section 5) as PyTorch hooks, usable as a context manager.

    with intervene(model, arch, Intervention.remove(r)):
        model.generate(...)

Edits are made in place on the hooked tensor, as the reference code's linear hooks do:
transformers keeps a reference to each block's output, so an edit at the input of block ``l`` is
also what a reader of block ``l - 1``'s output sees. COSMIC's scores were defined with that
behaviour. The exception is ACE (``affine``): the reference code's affine hooks edit a copy, so
the output of block ``l - 1`` stays as it was; ``affine`` does the same.

For models with norms after the writers (Gemma 2/3), removal acts on the writer's output before
the norm, along ``u = g * r_hat`` (``g`` the norm's gain): the normalised output is then
orthogonal to ``r_hat``, which is exactly what the baked weights do (spec section 6).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math.projections import affine_target, remove_component_, scale_component_, unit
from cosmic_bake.model.architecture import Architecture

KINDS = ("remove", "add", "affine", "pin", "scale", "remove_at")


@dataclass(frozen=True)
class Intervention:
    """One edit of the residual stream.

    ``remove``: at every block input and every writer output, ``x <- x - (x . r_hat) r_hat``. With
    ``strengths`` ``[n_layers + 1]`` (a weighted removal, beyond the paper): ``x <- x - s_0 (x . r_hat)
    r_hat`` at block 0's input and ``w <- w - s_{l+1} (w . u) u`` at block ``l``'s writer outputs
    only: exactly what weights baked with those coefficients compute.
    ``add``: at the input of block ``layer`` only, ``x <- x + alpha * r``.
    ``affine``: at the input of block ``layer``, ``x <- x - (x . r_hat) r_hat + (mu . r_hat) r_hat
    + alpha * r`` (ACE; ``mu`` the harmless mean, the reference point).
    ``pin``: the affine edit weights can carry exactly (baked ``affine``): removal at the input of
    block 0 and at every writer output, so no block ever writes along ``r_hat``, plus
    ``c = (mu . r_hat) r_hat + alpha * r`` added at the input of block ``layer``. The stream's
    component along ``r_hat`` is then 0 before ``layer`` and pinned to ``c . r_hat`` from there on.
    ``remove_at``: removal at the input of block ``layer`` only (in place): how the paper's code
    jailbreaks a model before running COSMIC again on it (hook only; weights cannot carry it).
    ``scale`` (beyond the paper; ``alpha`` is ``beta``): the component along ``r_hat`` is scaled by
    ``1 + beta`` around the midpoint ``m`` of the harmful and harmless means' projections
    (``m = mu . r_hat + |r| / 2``): ``x <- x + beta ((x . r_hat) - m) r_hat`` at block 0's input
    and ``w <- w + beta (w . r_hat) r_hat`` at every writer output, so at every layer the
    projection ``p`` becomes ``p + beta (p - m)``: prompts on the harmful side move further toward
    refusal, prompts on the harmless side away from it (ACE moves both the same way).
    """

    kind: str
    direction: torch.Tensor  # [d]; or a stack [K, d] (and ``reference`` too): batch row k gets row k
    layer: int | None = None
    alpha: float = 1.0
    reference: torch.Tensor | None = None
    strengths: torch.Tensor | None = None  # ``remove`` only: [n_layers + 1] weights (embedding, blocks)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CosmicBakeError(f"unknown intervention '{self.kind}'", f"use one of {', '.join(KINDS)}")
        if self.kind != "remove" and self.layer is None:
            raise CosmicBakeError(f"the '{self.kind}' intervention needs a layer", "pass the layer of the direction")
        if self.kind in ("affine", "pin", "scale") and self.reference is None:
            raise CosmicBakeError(
                "the affine intervention needs the harmless reference point", "use a direction artifact from select"
            )

    @classmethod
    def remove(cls, r: torch.Tensor, strengths: torch.Tensor | None = None) -> Intervention:
        return cls("remove", r, strengths=strengths)

    @classmethod
    def add(cls, r: torch.Tensor, layer: int, alpha: float = 1.0) -> Intervention:
        return cls("add", r, layer, alpha)

    @classmethod
    def affine(cls, r: torch.Tensor, mu: torch.Tensor, layer: int, alpha: float = 0.0) -> Intervention:
        return cls("affine", r, layer, alpha, mu)

    @classmethod
    def pin(cls, r: torch.Tensor, mu: torch.Tensor, layer: int, alpha: float = 0.0) -> Intervention:
        return cls("pin", r, layer, alpha, mu)

    @classmethod
    def scale(cls, r: torch.Tensor, mu: torch.Tensor, layer: int, beta: float = 1.0) -> Intervention:
        return cls("scale", r, layer, beta, mu)

    def midpoint(self) -> float:
        """``scale``: the projection halfway between the harmless and harmful means at the direction's layer."""
        r = self.direction.detach().to(torch.float64)
        return float(self.reference.detach().to(torch.float64) @ unit(r)) + float(r.norm()) / 2

    def constant(self) -> torch.Tensor:
        """The constant vector of the edit (float64): ``alpha r`` or ACE's target at block ``layer``;
        for ``scale``, ``-beta m r_hat``, added at block 0's input (the embedding) after scaling."""
        r = self.direction.detach().to(torch.float64)
        if self.kind == "add":
            return self.alpha * r
        r_hat = unit(r)
        if self.kind == "scale":
            return -self.alpha * self.midpoint() * r_hat
        mu = self.reference.detach().to(torch.float64)
        return affine_target(mu, r, r_hat, self.alpha)


def stacked(interventions: list[Intervention]) -> Intervention:
    """One intervention whose batch row ``k`` gets ``interventions[k]`` (same kind, layer and alpha).

    Selection stacks the candidates of one layer: a pass over K copies of a packed prompt row
    scores K candidates, with the same result per row as K passes (rows never see each other).
    """
    first = interventions[0]
    if any((iv.kind, iv.layer, iv.alpha) != (first.kind, first.layer, first.alpha) for iv in interventions):
        raise ValueError("stacked interventions must share kind, layer and alpha")
    reference = None if first.reference is None else torch.stack([iv.reference for iv in interventions])
    return Intervention(
        first.kind, torch.stack([iv.direction for iv in interventions]), first.layer, first.alpha, reference
    )


BAKED_MODES = ("ablate", "add", "affine", "scale")


def baked_hook(
    mode: str, r: torch.Tensor, mu: torch.Tensor, layer: int, alpha: float, strengths: torch.Tensor | None = None
) -> Intervention:
    """The runtime hook that a checkpoint baked in ``mode`` equals (what ``verify`` compares with).

    ``ablate`` -> ``remove``; ``add`` -> ``add`` at ``layer``; ``affine`` -> ``pin`` (removal by
    every writer plus ACE's constant at ``layer``: the affine form weights can carry exactly).
    """
    if mode == "ablate":
        return Intervention.remove(r, strengths)
    if mode == "add":
        return Intervention.add(r, layer, alpha)
    if mode == "affine":
        return Intervention.pin(r, mu, layer, alpha)
    if mode == "scale":
        return Intervention.scale(r, mu, layer, alpha)
    raise CosmicBakeError(f"unknown baked mode '{mode}'", f"use one of {', '.join(BAKED_MODES)}")


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Cast:
    """A float64 CPU vector handed out in whatever dtype and device the activation has, cast once per pair.

    Layers of one model may sit on different devices (accelerate's device map), so the copy is
    chosen by the tensor being edited, never by the model. The cast happens on the CPU before the
    move (MPS has no float64).
    """

    def __init__(self, v: torch.Tensor) -> None:
        v = v.detach().to("cpu")
        self.v = v.unsqueeze(-2) if v.ndim == 2 else v  # a stack [K, d] edits batch row k with row k
        self.cache: dict[tuple, torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if key not in self.cache:
            self.cache[key] = self.v.to(dtype=x.dtype).to(device=x.device)
        return self.cache[key]


def _remove_pre(r_hat: _Cast):
    def hook(_module, args, kwargs):
        x = _hidden(args, kwargs)
        remove_component_(x, r_hat.like(x))

    return hook


def _remove_out(r_hat: _Cast):
    def hook(_module, _args, output):
        x = _output_tensor(output)
        remove_component_(x, r_hat.like(x))
        return output

    return hook


def _scale_pre(r_hat: _Cast, beta: float, midpoint: float):
    def hook(_module, args, kwargs):
        x = _hidden(args, kwargs)
        scale_component_(x, r_hat.like(x), beta, midpoint)

    return hook


def _scale_out(r_hat: _Cast, beta: float):
    def hook(_module, _args, output):
        x = _output_tensor(output)
        scale_component_(x, r_hat.like(x), beta)
        return output

    return hook


def _add_pre(vector: _Cast):
    def hook(_module, args, kwargs):
        x = _hidden(args, kwargs)
        x += vector.like(x)

    return hook


def _affine_pre(r_hat: _Cast, target: _Cast):
    """ACE on a copy of the block input, as the official affine hooks do (they ``clone()``).

    Unlike the linear hooks, the recorded output of the block before keeps its unedited value:
    only the block's own input changes. Selection scores read that output when it is an
    evaluation layer, so this is what makes ``--mode ace`` match the official scores.
    """

    def hook(_module, args, kwargs):
        x = _hidden(args, kwargs).clone()
        remove_component_(x, r_hat.like(x))
        x += target.like(x)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    return hook


def writer_directions(arch: Architecture, r_hat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block, the unit vectors removed from (attention, MLP) outputs.

    ``r_hat`` itself, or ``unit(g * r_hat)`` where a norm with gain ``g`` follows the writer.
    """
    out = []
    for b in arch.blocks:
        pair = []
        for norm in (b.attn_post_norm, b.mlp_post_norm):
            pair.append(r_hat if norm is None else unit(arch.norm_gain(norm) * r_hat))
        out.append((pair[0], pair[1]))
    return out


def register(arch: Architecture, iv: Intervention) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the hooks for ``iv``; the caller removes the returned handles."""
    r = iv.direction.detach().to(torch.float64)
    if r.ndim not in (1, 2) or r.shape[-1] != arch.d_model or (r.ndim == 2 and iv.kind == "scale"):
        raise CosmicBakeError(
            f"direction has shape {tuple(r.shape)} but the model's hidden size is {arch.d_model}",
            "use a direction selected on this model",
        )
    r_hat = unit(r)
    if iv.kind != "remove" and not 0 <= iv.layer < arch.n_layers:
        raise CosmicBakeError(
            f"layer {iv.layer} is out of range for a {arch.n_layers}-layer model",
            "use a direction selected on this model",
        )
    handles = []
    if iv.strengths is not None:
        return _register_weighted(arch, iv, r_hat)
    if iv.kind == "scale":
        if arch.has_post_norms:
            raise CosmicBakeError(
                "the scale edit is not exact where norms follow the writers (Gemma 2/3)",
                "use --mode ablate / affine on this model",
            )
        cast = _Cast(r_hat)
        handles.append(
            arch.blocks[0].block.register_forward_pre_hook(_scale_pre(cast, iv.alpha, iv.midpoint()), with_kwargs=True)
        )
        for b in arch.blocks:
            handles.append(b.attn.register_forward_hook(_scale_out(cast, iv.alpha)))
            handles.append(b.mlp.register_forward_hook(_scale_out(cast, iv.alpha)))
        return handles
    if iv.kind in ("remove", "pin"):
        cast = _Cast(r_hat)
        for i, (b, (u_attn, u_mlp)) in enumerate(zip(arch.blocks, writer_directions(arch, r_hat))):
            if iv.kind == "remove" or i == 0:
                handles.append(b.block.register_forward_pre_hook(_remove_pre(cast), with_kwargs=True))
            handles.append(b.attn.register_forward_hook(_remove_out(cast if u_attn is r_hat else _Cast(u_attn))))
            handles.append(b.mlp.register_forward_hook(_remove_out(cast if u_mlp is r_hat else _Cast(u_mlp))))
        if iv.kind == "remove":
            return handles
    block = arch.blocks[iv.layer].block
    if iv.kind == "remove_at":
        handles.append(block.register_forward_pre_hook(_remove_pre(_Cast(r_hat)), with_kwargs=True))
    elif iv.kind in ("add", "pin"):
        handles.append(block.register_forward_pre_hook(_add_pre(_Cast(iv.constant())), with_kwargs=True))
    else:
        target = iv.constant()
        handles.append(block.register_forward_pre_hook(_affine_pre(_Cast(r_hat), _Cast(target)), with_kwargs=True))
    return handles


def _register_weighted(arch: Architecture, iv: Intervention, r_hat: torch.Tensor) -> list:
    """Weighted removal: block 0's input and each block's writer outputs, each with its own strength."""
    s = iv.strengths.detach().to(torch.float64).reshape(-1)
    if iv.kind != "remove" or r_hat.ndim != 1 or s.numel() != arch.n_layers + 1:
        raise CosmicBakeError(
            f"per-layer strengths need one removal direction and {arch.n_layers + 1} weights, "
            f"got kind {iv.kind} and {s.numel()} weights",
            "use a direction searched on this model",
        )
    cast = _Cast(r_hat)
    handles = [arch.blocks[0].block.register_forward_pre_hook(_scale_pre(cast, -float(s[0]), 0.0), with_kwargs=True)]
    for i, (b, (u_attn, u_mlp)) in enumerate(zip(arch.blocks, writer_directions(arch, r_hat))):
        k = -float(s[i + 1])
        handles.append(b.attn.register_forward_hook(_scale_out(cast if u_attn is r_hat else _Cast(u_attn), k)))
        handles.append(b.mlp.register_forward_hook(_scale_out(cast if u_mlp is r_hat else _Cast(u_mlp), k)))
    return handles


@contextlib.contextmanager
def intervene(arch: Architecture, *interventions: Intervention) -> Iterator[None]:
    """Apply interventions for the duration of the ``with`` block (nothing if none given)."""
    handles = []
    try:
        for iv in interventions:
            handles += register(arch, iv)
        yield
    finally:
        for h in handles:
            h.remove()
