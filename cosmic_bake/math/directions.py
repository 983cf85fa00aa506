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
