"""Projections used by the interventions and by baking.

Shapes: ``x`` is ``[..., d]`` (a batch of residual-stream vectors), ``r`` and ``r_hat`` are
``[d]``, or for the runtime hooks a stack ``[K, 1, d]`` (one direction per batch row). The unit
direction is computed as ``r / (|r| + 1e-8)`` exactly as the COSMIC and Arditi et al. reference
code does, so that a zero candidate (for example the difference of means at a position where
every prompt has the same token at layer 0) becomes a no-op instead of NaN.
"""

from __future__ import annotations

import torch

UNIT_EPS = 1e-8


def unit(r: torch.Tensor) -> torch.Tensor:
    """``r / (|r| + 1e-8)``, computed in ``r``'s own dtype (float64 for candidates)."""
    return r / (r.norm(dim=-1, keepdim=True) + UNIT_EPS)


def along(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``x . r_hat`` as ``[..., 1]``: ``r_hat`` ``[d]`` for every vector, or a stack ``[K, 1, d]``
    with one direction per batch row of ``x [K, T, d]`` (selection scores K candidates per pass)."""
    if r_hat.ndim == 1:
        return (x @ r_hat).unsqueeze(-1)
    return x @ r_hat.transpose(-1, -2)


def remove_component_(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``x <- x - (x . r_hat) r_hat``: linear removal (LCE ablation), in place.

    In place on purpose: the reference code edits the hooked tensor in place, and transformers keeps
    a reference to each block's output, so an in-place edit at the input of block ``l`` is also
    what a reader of block ``l - 1``'s output sees. Matching the reference scores needs that.
    """
    r_hat = r_hat.to(x)
    x -= along(x, r_hat) * r_hat
    return x


def scale_component_(x: torch.Tensor, r_hat: torch.Tensor, beta: float, midpoint: float = 0.0) -> torch.Tensor:
    """``x <- x + beta ((x . r_hat) - midpoint) r_hat``, in place (the ``scale`` steering mode)."""
    r_hat = r_hat.to(x)
    proj = x @ r_hat
    if midpoint:
        proj = proj - midpoint
    x += (beta * proj).unsqueeze(-1) * r_hat
    return x


def affine_target(mu: torch.Tensor, r: torch.Tensor, r_hat: torch.Tensor, alpha: float) -> torch.Tensor:
    """The vector ACE adds after removal: ``(mu . r_hat) r_hat + alpha * r`` (rows of a ``[K, d]`` stack each)."""
    dot = mu @ r_hat if r_hat.ndim == 1 else (mu * r_hat).sum(-1, keepdim=True)
    return dot * r_hat + alpha * r


def project_out_rows(weight: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``(I - r_hat r_hat^T) W`` for an output-side weight ``W`` of shape ``[d, *]``."""
    return weight - torch.outer(r_hat, r_hat @ weight)


def project_out_cols(weight: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``E (I - r_hat r_hat^T)`` for an embedding ``E`` of shape ``[vocab, d]``."""
    return weight - torch.outer(weight @ r_hat, r_hat)


# In-place, blockwise forms for baking large weights: float64 math on one block of rows at a time,
# stored back in the weight's own dtype. Blocks of 64K elements (512 KiB of float64) stay in cache
# and are reused by the allocator; whole-tensor float64 copies cost more in fresh-page faults than
# in arithmetic (measured: 0.2 s vs 3 s for a 151936 x 896 embedding).
BLOCK_ELEMENTS = 1 << 16


def _row_step(n_cols: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, n_cols))


def project_out_rows_(
    weight: torch.Tensor, r_hat: torch.Tensor, block_elements: int = BLOCK_ELEMENTS, coeff: float = 1.0
) -> torch.Tensor:
    """In place ``W <- (I - k r_hat r_hat^T) W`` for a contiguous ``W [d, *]``, computed in float64.

    ``k = 1`` removes the component (ablation); ``k = -beta`` scales it by ``1 + beta`` (the
    ``scale`` steering mode). Two passes over contiguous row blocks: ``c = r_hat^T W`` accumulated
    in float64, then ``W[i] <- W[i] - k r_hat[i] c``. Same result as :func:`project_out_rows` (for
    ``k = 1``) up to float64 rounding.
    """
    flat = weight.view(weight.shape[0], -1)
    r = r_hat.to(torch.float64)
    step = _row_step(flat.shape[1], block_elements)
    c = torch.zeros(flat.shape[1], dtype=torch.float64)
    for a in range(0, flat.shape[0], step):
        c += r[a : a + step] @ flat[a : a + step].double()
    for a in range(0, flat.shape[0], step):
        block = flat[a : a + step]
        block.copy_(block.double() - coeff * torch.outer(r[a : a + step], c))
    return weight


def project_out_cols_(
    weight: torch.Tensor, r_hat: torch.Tensor, block_elements: int = BLOCK_ELEMENTS, coeff: float = 1.0
) -> torch.Tensor:
    """In place ``E <- E (I - k r_hat r_hat^T)`` for a contiguous ``E [n, d]``, in float64 row blocks."""
    flat = weight.view(-1, weight.shape[-1])
    r = r_hat.to(torch.float64)
    step = _row_step(flat.shape[1], block_elements)
    for a in range(0, flat.shape[0], step):
        block = flat[a : a + step]
        b = block.double()
        block.copy_(b - coeff * torch.outer(b @ r, r))
    return weight
