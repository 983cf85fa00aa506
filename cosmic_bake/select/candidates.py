"""Candidates: the mean activation differences (or PCA directions) at every (position, layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math.directions import (
    DIRECTION_METHODS,
    MeanAccumulator,
    mean_difference,
    pca_direction,
    project_off,
)
from cosmic_bake.model.architecture import Architecture
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.model.forward import forward
from cosmic_bake.progress import progress

MODES = ("ablate", "affine", "ace")


SELECTORS = ("cosmic", "refusal-score")


@dataclass
class Batches:
    """A prompt set, tokenized once into batches (in order).

    Packed by default: each batch is one unpadded row (see :meth:`ChatFormat.encode_packed`),
    which gives the same activations as left padding up to float error and skips the padding's
    compute. ``packed=False`` gives the reference code's left-padded batches.
    """

    prompts: list[str]
    encoded: list[dict[str, torch.Tensor]]

    @classmethod
    def make(
        cls,
        fmt: ChatFormat,
        prompts: list[str],
        batch_size: int,
        packed: bool = True,
        share_prefix: bool = False,
        window: int | None = None,
    ) -> Batches:
        """``share_prefix``: packed rows hold the prompts' common token prefix once (see
        :meth:`ChatFormat.encode_packed`; ``window`` is the model's sliding attention window)."""
        chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
        if packed:
            return cls(prompts, [fmt.encode_packed(c, share_prefix, window) for c in chunks])
        enc = [fmt.encode(c) for c in chunks]
        for e in enc:
            fmt.check_suffix(e["input_ids"])
        return cls(prompts, enc)


@dataclass
class Candidates:
    """Difference-in-means candidates at positions ``-P..-1`` of every layer's block input."""

    directions: torch.Tensor  # [P, L, d] float64, unnormalised
    harmless_mean: torch.Tensor  # [P, L, d] float64 (the affine reference point)
    harmful_mean: torch.Tensor  # [P, L, d]
    similarities: torch.Tensor  # [L] cos of harmful/harmless mean block outputs, last token

    @property
    def n_positions(self) -> int:
        return self.directions.shape[0]


def collect_candidates(
    model, arch: Architecture, fmt: ChatFormat, harmful: Batches, harmless: Batches, method: str = "mean"
) -> Candidates:
    """One pass over each training set gives both the candidates and the layer similarities.

    ``method="mean"`` is the paper's difference in means. ``method="pca"`` keeps every prompt's
    activations (float32, ``n x P x L x d`` per set) and takes the first principal component of
    the paired differences instead (:func:`~cosmic_bake.math.directions.pca_direction`); the means,
    the reference point and the layer similarities are the same either way. ``method="projected"``
    is the difference in means less its component along the harmless mean of the same position and
    layer (:func:`~cosmic_bake.math.directions.project_off`, heretic's projected abliteration).
    """
    if method not in DIRECTION_METHODS:
        raise CosmicBakeError(f"unknown direction method '{method}'", f"use one of {', '.join(DIRECTION_METHODS)}")
    P, L = fmt.n_positions, arch.n_layers
    means, rows = {}, {}
    for name, batches in (("harmful", harmful), ("harmless", harmless)):
        acc_in, acc_out = MeanAccumulator(), MeanAccumulator()
        kept = []
        for batch in progress(batches.encoded, f"activations ({name} train)"):
            rec = forward(model, arch, batch, input_positions=P, output_layers=list(range(L)))
            _check_finite(rec.inputs, f"{name} training activations")
            per_prompt = rec.inputs.permute(0, 2, 1, 3)  # [B, P, L, d]
            acc_in.update(per_prompt)
            acc_out.update(rec.outputs)
            if method == "pca":
                kept.append(per_prompt.float())
        means[name] = (acc_in.mean(), acc_out.mean())
        rows[name] = kept
    if method == "pca":
        directions = pca_direction(torch.cat(rows["harmful"]), torch.cat(rows["harmless"]))
    else:
        directions = mean_difference(means["harmful"][0], means["harmless"][0])
        if method == "projected":
            directions = project_off(directions, means["harmless"][0])
    sims = torch.nn.functional.cosine_similarity(means["harmful"][1], means["harmless"][1], dim=-1)
    return Candidates(directions, means["harmless"][0], means["harmful"][0], sims)


def _check_finite(t: torch.Tensor | None, what: str) -> None:
    if t is not None and not torch.isfinite(t).all():
        raise CosmicBakeError(
            f"NaN or infinite values in the {what}",
            "load the model in float32 (--dtype float32) or check the model files",
        )
