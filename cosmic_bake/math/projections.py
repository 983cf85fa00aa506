"""Projections used by the interventions and by baking.

Shapes: ``x`` is ``[..., d]`` (a batch of residual-stream vectors), ``r`` and ``r_hat`` are
``[d]``. The unit direction is computed as ``r / (|r| + 1e-8)`` exactly as the COSMIC and
Arditi et al. reference code does, so that a zero candidate (for example the difference of means
at a position where every prompt has the same token at layer 0) becomes a no-op instead of NaN.
"""

from __future__ import annotations

import torch

UNIT_EPS = 1e-8


def unit(r: torch.Tensor) -> torch.Tensor:
    """``r / (|r| + 1e-8)``, computed in ``r``'s own dtype (float64 for candidates)."""
    return r / (r.norm(dim=-1, keepdim=True) + UNIT_EPS)


def remove_component(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``x - (x . r_hat) r_hat``: linear removal (LCE ablation), out of place."""
    r_hat = r_hat.to(x)
    return x - (x @ r_hat).unsqueeze(-1) * r_hat


def remove_component_(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """In-place :func:`remove_component`.

    In place on purpose: the reference code edits the hooked tensor in place, and transformers keeps
    a reference to each block's output, so an in-place edit at the input of block ``l`` is also
    what a reader of block ``l - 1``'s output sees. Matching the reference scores needs that.
    """
    r_hat = r_hat.to(x)
    x -= (x @ r_hat).unsqueeze(-1) * r_hat
    return x


def affine_target(mu: torch.Tensor, r: torch.Tensor, r_hat: torch.Tensor, alpha: float) -> torch.Tensor:
    """The vector ACE adds after removal: ``(mu . r_hat) r_hat + alpha * r``."""
    return (mu @ r_hat) * r_hat + alpha * r


def project_out_rows(weight: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``(I - r_hat r_hat^T) W`` for an output-side weight ``W`` of shape ``[d, *]``."""
    return weight - torch.outer(r_hat, r_hat @ weight)


def project_out_cols(weight: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``E (I - r_hat r_hat^T)`` for an embedding ``E`` of shape ``[vocab, d]``."""
    return weight - torch.outer(weight @ r_hat, r_hat)
