"""Per-layer removal strengths (beyond the paper): the tent kernel heretic popularised.

Strengths are indexed like a direction artifact's ``strengths``: entry 0 is the embedding (treated
as layer -1, block 0's input), entry ``l + 1`` block ``l``'s writers.
"""

from __future__ import annotations

import torch


def tent(n_layers: int, peak: float, width: float, max_weight: float, min_weight: float) -> torch.Tensor:
    """``[n_layers + 1]`` strengths: ``max_weight`` at layer ``peak``, falling linearly to ``min_weight``
    at distance ``width``, and 0 beyond (the writers there are left alone).

    A removal weighted this way edits the layers where the refusal feature is written most, and
    leaves the early layers (lexical features every prompt needs) and the last ones (next-token
    prediction) mostly intact, which is where uniform removal spends its KL.
    """
    layers = torch.arange(-1, n_layers, dtype=torch.float64)
    dist = (layers - peak).abs()
    w = max_weight + (dist / max(width, 1e-9)) * (min_weight - max_weight)
    return torch.where(dist <= width, w, torch.zeros_like(w))
