"""Applying a plan: the edit of each tensor kind, the vectors per writer, the tensor sources of each output shard."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from cosmic_bake.bake.plan import BakePlan
from cosmic_bake.export import safetensors_read
from cosmic_bake.export.card import CARD_FILE
from cosmic_bake.export.safetensors_read import (
    INDEX_FILE,
    WEIGHT_SUFFIXES,
    Listing,
    TensorInfo,
    read_tensor,
)
from cosmic_bake.export.safetensors_write import DeferredTensor, StoredTensor, TensorSource
from cosmic_bake.math.projections import project_out_cols_, project_out_rows_, unit
from cosmic_bake.outputs import MANIFEST

_NOT_COPIED = {CARD_FILE, MANIFEST, INDEX_FILE, "config.json"}


def apply_edit(tensor: torch.Tensor, kind: str, v: torch.Tensor | None, coeff: float = 1.0) -> torch.Tensor:
    """Apply one edit kind in place (float64 math, stored back in the tensor's dtype).

    ``coeff`` 1 removes the component along ``v``; ``-beta`` scales it by ``1 + beta`` (mode ``scale``).
    """
    if kind == "copy":
        return tensor
    if kind == "rows":
        project_out_rows_(tensor, v, coeff=coeff)
    elif kind in ("cols", "bias"):
        project_out_cols_(tensor, v, coeff=coeff)
    elif kind == "expert_rows":
        for w in tensor:
            project_out_rows_(w, v, coeff=coeff)
    elif kind == "expert_cols":
        for w in tensor:
            project_out_cols_(w, v, coeff=coeff)
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    return tensor


def edit_vectors(plan: BakePlan, listing: Listing, r_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """``"r"`` -> r_hat, and per post-norm key ``u = unit(g * r_hat)`` with the checkpoint's gain ``g``."""
    vectors = {"r": r_hat}
    for key, norm in plan.gains.items():
        info = listing.tensors[norm]
        with open(listing.folder / info.file, "rb") as fh:
            gain = read_tensor(fh, info).double() + plan.gain_offset
        vectors[key] = unit(gain * r_hat)
    return vectors


def shard_sources(
    plan: BakePlan,
    listing: Listing,
    vectors: dict[str, torch.Tensor],
    constant: torch.Tensor | None = None,
    coeff: Callable[[int | None], float] = lambda _block: 1.0,
) -> dict[str, dict[str, TensorSource]]:
    """Per output shard, what each tensor is written from: its source bytes, or an edit made when written.

    ``coeff(block)`` is the projection coefficient of a writer of ``block`` (``None``: the
    embedding): 1 removes, a strength below 1 removes part, ``-beta`` scales (mode ``scale``).

    ``constant`` (float64, already divided by the embedding scale where it goes to the embedding)
    is added to every row of the tensors whose edit has ``constant`` set.
    """
    shards: dict[str, dict[str, TensorSource]] = {}
    for file, edits in plan.shards.items():
        shards[file] = {}
        for e in edits:
            c = constant if e.constant else None
            if e.kind == "zeros":
                shards[file][e.name] = DeferredTensor(e.dtype, e.shape, _zeros_plus(e.shape, e.dtype, c))
                continue
            info = listing.tensors[e.source]
            path = listing.folder / info.file
            if e.kind == "copy" and c is None:
                shards[file][e.name] = StoredTensor(path, info)
            else:
                v = vectors.get(e.vector) if e.vector else None
                shards[file][e.name] = _edited(path, info, e.kind, v, c, coeff(e.block))
    return shards


def _zeros_plus(shape: tuple[int, ...], dtype: str, c: torch.Tensor | None):
    def make() -> torch.Tensor:
        t = torch.zeros(shape, dtype=torch.float64)
        if c is not None:
            t += c
        return t.to(safetensors_read.torch_dtype(dtype))

    return make


def _edited(
    path: Path, info: TensorInfo, kind: str, v: torch.Tensor | None, c: torch.Tensor | None, coeff: float = 1.0
) -> DeferredTensor:
    """The edited tensor, read and edited only when the writer reaches it (then ``+ c`` on every row)."""

    def make() -> torch.Tensor:
        with open(path, "rb") as fh:
            t = apply_edit(read_tensor(fh, info), kind, v, coeff)
        if c is not None:
            t.copy_(t.double() + c)
        return t

    return DeferredTensor(info.dtype, info.shape, make)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the edits on one thread, then restore torch's setting.

    The edits are memory-bound matrix-vector work on cache-sized blocks; an OpenMP fork/join per
    block costs more than it gains, and much more when the cores are shared (measured 15 s vs
    0.2 s for one embedding on a busy 2-core machine).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def edited_config(folder: Path, untie: bool, base: dict | None = None) -> dict:
    """The source config.json (or ``base``), with ``tie_word_embeddings: false`` when untying."""
    config = dict(base) if base is not None else json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    return config


def copy_side_files(folder: Path, out: Path) -> tuple[list[str], list[str]]:
    """Copy tokenizer, chat template, generation config and other small files; never other weights.

    Returns (copied, skipped). Sub-folders are skipped: on the Hub they hold other weight formats
    (``original/consolidated.pth``) that would ship unedited.
    """
    copied, skipped = [], []
    for p in sorted(folder.iterdir()):
        if p.name in _NOT_COPIED or p.name.startswith("."):
            continue
        if p.is_dir() or p.suffix in WEIGHT_SUFFIXES:
            skipped.append(p.name)
            continue
        shutil.copy2(p, out / p.name)
        copied.append(p.name)
    return copied, skipped
