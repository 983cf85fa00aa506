"""The bake plan (pure): one :class:`TensorEdit` per output tensor, from the layout and the safetensors headers."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from cosmic_bake.bake.constant import ConstantPlacement
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export.safetensors_read import (
    Listing,
    TensorInfo,
    packed_shards,
    same_shards,
)
from cosmic_bake.model.layout import Layout

EMBEDDINGS = ("untie", "skip")


KINDS = ("rows", "expert_rows", "cols", "expert_cols", "bias", "copy", "zeros")


@dataclass(frozen=True)
class TensorEdit:
    """How one output tensor is made from one source tensor.

    ``kind``: ``rows`` ``(I - v v^T) W`` for ``W [d, *]``; ``expert_rows`` the same per expert of
    ``[E, d, *]``; ``cols`` ``E (I - v v^T)`` for ``[*, d]`` (embeddings, writers stored
    transposed); ``expert_cols`` per expert of ``[E, *, d]``; ``bias`` ``b - (b . v) v`` (per
    expert for ``[E, d]``); ``copy`` unchanged. ``vector`` names the unit vector ``v``: ``"r"``
    or a post-norm key ``"<block>.<part>"`` whose ``u = unit(g * r)`` is used.
    """

    name: str  # output tensor name
    source: str  # source tensor name (differs for a new lm_head)
    kind: str
    vector: str | None = None
    writer: str | None = None  # in-memory writer module, for the report
    constant: bool = False  # then add the baked constant (added vector / scale) after the edit
    shape: tuple[int, ...] | None = None  # for kind "zeros" (a new bias the output config needs)
    dtype: str | None = None
    block: int | None = None  # the writer's block (its removal strength); None: the embedding


@dataclass
class BakePlan:
    """What to write: per output shard file, its tensors in order; and where gains come from."""

    shards: dict[str, list[TensorEdit]]
    gains: dict[str, str]  # vector key -> on-disk name of the norm weight holding its gain
    gain_offset: float
    embeddings: str
    untie: bool
    indexed: bool  # write model.safetensors.index.json
    shard_metadata: dict[str, dict[str, str]]
    warnings: list[str]

    def edits(self) -> list[TensorEdit]:
        return [e for edits in self.shards.values() for e in edits]

    def counts(self) -> dict[str, int]:
        return dict(Counter(e.kind for e in self.edits()))

    def writers(self) -> list[str]:
        """The residual writers edited (in-memory module names, experts counted once)."""
        return list(dict.fromkeys(e.writer for e in self.edits() if e.writer))

    def embeddings_edited(self) -> list[str]:
        """On-disk names of the embeddings whose rows were projected."""
        return [e.name for e in self.edits() if e.kind == "cols" and e.writer is None]


def _vector_key(layout: Layout, block: int, part: str) -> str:
    return f"{block}.{part}" if (block, part) in layout.post_norms else "r"


def _weight_kind(info: TensorInfo, d: int, memory: str) -> str:
    """Rows when the output dimension ``d`` comes first (``nn.Linear`` layout), cols if stored transposed."""
    shape = info.shape
    if len(shape) == 2 and shape[0] == d:
        return "rows"
    if len(shape) == 2 and shape[1] == d:
        return "cols"
    if len(shape) == 3 and shape[1] == d:
        return "expert_rows"
    if len(shape) == 3 and shape[2] == d:
        return "expert_cols"
    raise CosmicBakeError(
        f"writer {info.name} ({memory}) has shape {list(shape)}, with no dimension of the hidden size {d}",
        "this checkpoint layout is not supported for baking",
    )


def _edit_for(layout: Layout, info: TensorInfo, embeddings: str, remove: bool = True) -> TensorEdit:
    memory = layout.memory_name(info.name)
    role = layout.writers.get(memory)
    if not remove:
        return TensorEdit(info.name, info.name, "copy")
    if role is not None:
        if info.dtype not in ("F64", "F32", "F16", "BF16"):
            raise CosmicBakeError(
                f"writer {info.name} is stored as {info.dtype}, not a float type",
                "bake an unquantized (float) checkpoint, then quantize the result",
            )
        kind = "bias" if role.role == "bias" else _weight_kind(info, layout.d_model, memory)
        vector = _vector_key(layout, role.block, role.part)
        return TensorEdit(info.name, info.name, kind, vector, role.writer, block=role.block)
    if memory == layout.embed or memory in layout.extra_embeds:
        if embeddings == "skip":
            return TensorEdit(info.name, info.name, "copy")
        return TensorEdit(info.name, info.name, "cols", "r")
    return TensorEdit(info.name, info.name, "copy")


def _disk_names(layout: Layout, listing: Listing) -> dict[str, list[str]]:
    """In-memory name -> on-disk names mapping to it (several for per-expert tensors)."""
    out: dict[str, list[str]] = {}
    for name in listing.tensors:
        out.setdefault(layout.memory_name(name), []).append(name)
    return out


def plan_bake(
    layout: Layout,
    listing: Listing,
    *,
    embeddings: str = "untie",
    max_shard_size: int | None = None,
    remove: bool = True,
    embedding_changes: bool | None = None,
) -> BakePlan:
    """Decide every output tensor's edit and the shard layout; reads no tensor data.

    ``remove`` False plans no removal (mode ``add``: only the constant, planned by the caller);
    ``embedding_changes`` says whether the embedding is written changed (default: ``remove``),
    which is when a tied head must be untied.
    """
    if embeddings not in EMBEDDINGS:
        raise CosmicBakeError(f"unknown embeddings handling '{embeddings}'", f"use one of {', '.join(EMBEDDINGS)}")
    on_disk = _disk_names(layout, listing)
    missing = [m for m in [*layout.writers, layout.embed] if m not in on_disk]
    if missing:
        raise CosmicBakeError(
            f"the checkpoint has no tensor for {missing[0]} ({len(missing)} missing)",
            "the weights do not match config.json; re-download or re-export the model",
        )
    gains = {}
    for (block, part), norm in layout.post_norms.items():
        if norm not in on_disk:
            raise CosmicBakeError(f"the checkpoint has no tensor for the norm {norm}", "re-download the model")
        gains[f"{block}.{part}"] = on_disk[norm][0]
    edits = {name: _edit_for(layout, info, embeddings, remove) for name, info in listing.tensors.items()}
    # Untying always writes tie_word_embeddings: false; the head tensor is added unless the
    # checkpoint already stores one (then it holds the original embedding and is copied as is).
    untie = layout.tied and embeddings == "untie" and (remove if embedding_changes is None else embedding_changes)
    embed_disk = on_disk[layout.embed][0]
    order = list(listing.tensors)
    if untie and layout.lm_head not in on_disk:
        if layout.memory_name(layout.lm_head) != layout.lm_head:
            raise CosmicBakeError(
                f"cannot tell the on-disk name of the output head {layout.lm_head}",
                "pass --embeddings skip to leave the tied embedding alone",
            )
        edits[layout.lm_head] = TensorEdit(layout.lm_head, embed_disk, "copy")
        order.insert(order.index(embed_disk) + 1, layout.lm_head)
    sizes = {n: listing.tensors[edits[n].source].nbytes for n in order}
    if max_shard_size is None:
        shards = same_shards(listing, order, embed_disk)
        indexed = listing.index is not None or len(shards) > 1
        meta = {f: {**listing.metadata.get(f, {}), "format": "pt"} for f in shards}
    else:
        shards = packed_shards(order, sizes, max_shard_size)
        indexed = len(shards) > 1
        meta = {f: {"format": "pt"} for f in shards}
    return BakePlan(
        shards={f: [edits[n] for n in names] for f, names in shards.items()},
        gains=gains,
        gain_offset=layout.gain_offset,
        embeddings=embeddings,
        untie=untie,
        indexed=indexed,
        shard_metadata=meta,
        warnings=_warnings(layout, embeddings),
    )


def _warnings(layout: Layout, embeddings: str) -> list[str]:
    if embeddings != "skip":
        return []
    return [
        "embeddings skipped: the token embedding still writes the direction into the residual stream, "
        "so the baked model differs from the runtime hook (which removes it at every block input); "
        "verify will report the difference"
        + (" (the embedding is tied to the output head, which is left unchanged)" if layout.tied else "")
    ]


def add_constant(plan: BakePlan, placement: ConstantPlacement) -> None:
    """Mark the tensor that receives the constant; add the zero biases the output config needs."""
    found = False
    for edits in plan.shards.values():
        for i, e in enumerate(edits):
            if e.name == placement.tensor:
                edits[i] = dataclasses.replace(e, constant=True)
                found = True
    shard_of = {e.name: file for file, edits in plan.shards.items() for e in edits}
    for name, (shape, dtype) in placement.new_tensors.items():
        file = shard_of[name.removesuffix(".bias") + ".weight"]
        plan.shards[file].append(
            TensorEdit(name, "", "zeros", constant=name == placement.tensor, shape=shape, dtype=dtype)
        )
        found = found or name == placement.tensor
    if not found:  # pragma: no cover - place_constant only names tensors that exist or are new
        raise RuntimeError(f"no tensor {placement.tensor} to carry the constant")
