"""Difference-in-means candidates (spec section 1), accumulated as a stream.

Prompts arrive in batches; :class:`MeanAccumulator` keeps a float64 running sum so the means do not
depend on batch size or order beyond float64 rounding, and never holds all activations at once.
"""

from __future__ import annotations

import torch


class MeanAccumulator:
    """Running mean over the first axis of incoming batches, in float64."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, batch: torch.Tensor) -> MeanAccumulator:
        """Add ``batch`` ``[n, ...]``; returns self so calls chain."""
        summed = batch.detach().to(torch.float64).sum(dim=0)
        self.total = summed if self.total is None else self.total + summed
        self.count += batch.shape[0]
        return self

    def mean(self) -> torch.Tensor:
        """The mean of everything seen so far."""
        if self.total is None or self.count == 0:
            raise ValueError("MeanAccumulator.mean() called before any update")
        return self.total / self.count


def mean_difference(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    """``r = mean_harmful - mean_harmless`` (unnormalised, float64), any leading shape."""
    return harmful_mean.double() - harmless_mean.double()


DIRECTION_METHODS = ("mean", "pca", "projected")


def project_off(r: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``r - (r . a) a`` with ``a = reference / |reference|``, row by row over any leading shape.

    Projected abliteration (heretic's default): the difference of means also carries a share of
    the harmless mean itself (harmful activations are larger along it), and removing that share
    moves every prompt, harmless ones included. Dropping it leaves the part that separates the two
    sets. A zero reference leaves ``r`` unchanged.
    """
    a = reference.double()
    a = a / (a.norm(dim=-1, keepdim=True) + 1e-12)
    r = r.double()
    return r - (r * a).sum(-1, keepdim=True) * a


def pca_direction(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """First principal component of paired differences, as a direction comparable to the mean's.

    ``harmful`` and ``harmless`` are ``[n, ..., d]`` activations; prompt ``i`` of one set is paired
    with prompt ``i`` of the other (the first ``min`` of both). The principal component ``u`` of
    the centred differences is the axis along which the pairs differ most; its sign is set so that
    it points the way the mean difference ``m`` does, and it is scaled by ``m . u``. The result
    then has the same meaning as a difference in means for the additive and affine edits (adding
    it moves the harmless mean's projection onto the harmful one's), and is zero where ``m`` is.
    Returns ``[..., d]`` float64.
    """
    n = min(harmful.shape[0], harmless.shape[0])
    if n < 2:
        raise ValueError("pca_direction needs at least two pairs")
    diffs = harmful[:n].double() - harmless[:n].double()  # [n, ..., d]
    lead = diffs.shape[1:-1]
    d = diffs.shape[-1]
    flat = diffs.reshape(n, -1, d).transpose(0, 1)  # [K, n, d]
    mean = flat.mean(dim=1)  # [K, d]
    _, _, vh = torch.linalg.svd(flat - mean.unsqueeze(1), full_matrices=False)
    u = vh[:, 0, :]  # [K, d], unit
    proj = (u * mean).sum(dim=-1, keepdim=True)
    u = torch.where(proj < 0, -u, u)
    r = proj.abs() * u
    return r.reshape(*lead, d)
