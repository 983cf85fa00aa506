"""Bake linear removal of the refusal direction into a checkpoint's weights (spec section 6).

Every module that writes into the residual stream gets its output orthogonalised, so the stream
never carries the direction: ``W <- (I - r r^T) W`` for output-side weights ``[d, *]`` (attention
output and MLP down projections, every expert's and shared expert's), ``b <- b - (b . r) r`` for
their biases, ``E <- E (I - r r^T)`` for the token embedding (and additive position embeddings).
A writer followed by a norm with gain ``g`` (Gemma's sandwich norms) is orthogonalised against
``u = unit(g * r)`` instead, exactly what the runtime hook removes (``hooks.writer_directions``).

Three steps, each testable on its own:

1. **Layout** (:func:`~cosmic_bake.model.layout.model_layout`): which parameters are writers,
   post-writer norms and embeddings, by in-memory name, for every layer, and how on-disk names
   map to them (see :mod:`cosmic_bake.model.layout`).
2. **Plan** (:func:`plan_bake`, here): pure; from the layout and the tensor names, shapes and
   dtypes of the safetensors headers (:func:`~cosmic_bake.export.safetensors_read.list_weights`),
   one :class:`TensorEdit` per output tensor (``rows``, ``expert_rows``, ``cols``,
   ``expert_cols``, ``bias`` or ``copy``) and the output shard layout.
3. **Apply** (:func:`bake_folder`): each output shard is streamed out by
   :func:`~cosmic_bake.export.safetensors_write.write_safetensors`; an edited tensor is read with
   plain file reads (not ``safe_open``, whose memory map would count the whole shard's page
   cache on top of the copy being edited), edited in place in float64 chunks, cast back to the
   source dtype and written, one at a time; unedited tensors are copied byte for byte. Peak
   memory is about the largest edited tensor. The card comes from :mod:`cosmic_bake.export.card`.

The output appears atomically (``outputs.atomic_dir``); the source folder is only read.
Only linear removal (``mode == "ablate"``) is baked now; the plan's per-tensor edit kinds leave
room for the bias that affine / additive edits need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cosmic_bake import __version__
from cosmic_bake.artifacts import Direction, check_direction, load_direction, source_record
from cosmic_bake.bake_constant import ConstantPlacement, place_constant
from cosmic_bake.errors import CosmicBakeError, first_line
from cosmic_bake.export import safetensors_read, safetensors_write
from cosmic_bake.export.card import CARD_FILE, base_model_id, model_card
from cosmic_bake.export.safetensors_read import (
    INDEX_FILE,
    WEIGHT_SUFFIXES,
    Listing,
    TensorInfo,
    list_weights,
    packed_shards,
    parse_size,
    read_tensor,
    same_shards,
)
from cosmic_bake.export.safetensors_write import DeferredTensor, StoredTensor, TensorSource, write_index, write_shards
from cosmic_bake.math.projections import project_out_cols_, project_out_rows_, unit
from cosmic_bake.model.layout import Layout, model_layout, text_config
from cosmic_bake.outputs import MANIFEST, atomic_dir, check_target, manifest, write_json

EMBEDDINGS = ("untie", "skip")
_NOT_COPIED = {CARD_FILE, MANIFEST, INDEX_FILE, "config.json"}


# --------------------------------------------------------------------------------------------
# Plan: one edit per output tensor


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
        return TensorEdit(info.name, info.name, kind, _vector_key(layout, role.block, role.part), role.writer)
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


# --------------------------------------------------------------------------------------------
# Apply


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
    coeff: float = 1.0,
) -> dict[str, dict[str, TensorSource]]:
    """Per output shard, what each tensor is written from: its source bytes, or an edit made when written.

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
                shards[file][e.name] = _edited(path, info, e.kind, v, c, coeff)
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
def _one_thread() -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# Report and checks


@dataclass
class BakeReport:
    """What a bake did, JSON-serialisable via :meth:`to_dict`."""

    output: str
    model_type: str
    d_model: int
    n_layers: int
    direction_digest: str
    layer: int
    position: int
    mode: str
    selector: str
    embeddings: str
    tied: bool
    untied: bool
    edits: dict[str, int]
    writers: list[str]
    embeddings_edited: list[str]
    files: list[str]
    bytes_written: int
    largest_source_file: int
    warnings: list[str]
    timings: dict[str, float]
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    alpha: float = 0.0
    constant: str = ""  # where an add / affine constant was stored

    def to_dict(self) -> dict:
        return asdict(self)


def _load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - any config failure becomes one line
        raise CosmicBakeError(
            f"cannot read {folder}/config.json: {first_line(err)}", "pass a transformers model folder"
        ) from err


# --------------------------------------------------------------------------------------------
# Entry point


def bake_folder(
    source_folder: str | Path,
    direction: Direction | str | Path,
    out: str | Path,
    *,
    embeddings: str = "untie",
    force: bool = False,
    max_shard_size: str | int | None = None,
    allow_mismatch: bool = False,
    source=None,
    mode: str | None = None,
    alpha: float | None = None,
    inputs: Iterable[str | os.PathLike] = (),
) -> BakeReport:
    """Bake linear removal of ``direction`` into the safetensors model in ``source_folder``; write ``out``.

    ``direction`` is a :class:`Direction` or a run folder (then its selection scores go into the
    manifest). ``source`` is the :class:`~cosmic_bake.model.loading.ModelSource` the user named,
    when ``source_folder`` stands in for it (a GGUF's dequantized cache): the direction's model
    hash is checked against, and the manifest records, that source. ``max_shard_size`` reshards
    the output (default: the source's shard files, same names). ``mode`` / ``alpha`` override
    the artifact's (``ablate``, ``add``, ``affine``; see :func:`~cosmic_bake.model.hooks.baked_hook`
    for the hook each equals, :mod:`cosmic_bake.bake_constant` for where the constant goes).
    Returns a :class:`BakeReport`; its ``warnings`` say when the result differs from the hook.
    ``out`` may not be, contain or lie inside the source, the direction or ``inputs``; ``force``
    replaces only an earlier cosmic-bake output (:func:`cosmic_bake.outputs.check_target`).
    """
    from cosmic_bake.artifacts import model_hash
    from cosmic_bake.model.loading import ModelSource

    t0 = time.perf_counter()
    folder = Path(source_folder)
    out = Path(out)
    if not (folder / "config.json").is_file():
        raise CosmicBakeError(f"{folder} has no config.json", "pass a transformers model folder or a .gguf file")
    inputs = [folder, *([source.path] if getattr(source, "path", None) else []), *inputs]
    if not isinstance(direction, Direction):
        inputs.append(Path(direction))
    check_target(out, force=force, inputs=inputs)
    d, scores = load_direction(direction)
    d = d.with_mode(mode, alpha)
    config = _load_config(folder)
    d_model = int(getattr(text_config(config), "hidden_size", 0) or 0)
    src = source or ModelSource(str(folder), "folder", path=folder)
    record = source_record(src)
    if src.kind == "gguf":
        record["baked_from"] = str(folder)
    check_direction(d, d_model, model_hash(record), allow_mismatch)
    listing = list_weights(folder)
    layout = model_layout(config)
    placement = None
    if d.mode == "scale" and layout.post_norms:
        raise CosmicBakeError(
            "the scale edit is not exact where norms follow the writers (Gemma 2/3)", "use --mode ablate or affine"
        )
    if d.mode != "ablate":
        shapes = {n: (tuple(i.shape), i.dtype) for n, i in listing.tensors.items()}
        source_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        at = 0 if d.mode == "scale" else d.layer  # scale: the constant -beta m r_hat enters with the embedding
        placement = place_constant(layout, shapes, source_config, at, layout.embed_scale)
        if placement.kind == "embedding" and embeddings == "skip":
            raise CosmicBakeError(
                "the constant of a layer-0 edit goes into the embedding, which --embeddings skip leaves alone",
                "drop --embeddings skip",
            )
    plan = plan_bake(
        layout,
        listing,
        embeddings=embeddings,
        max_shard_size=parse_size(max_shard_size),
        remove=d.mode != "add",
        embedding_changes=d.mode != "add" or (placement is not None and placement.kind == "embedding"),
    )
    constant = None
    if placement is not None:
        _add_constant(plan, placement)
        constant = d.hook().constant() / placement.scale
    r_hat = unit(d.direction.double())
    vectors = edit_vectors(plan, listing, r_hat)
    timings = {"plan": time.perf_counter() - t0}
    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        t = time.perf_counter()
        coeff = -d.alpha if d.mode == "scale" else 1.0
        shards = shard_sources(plan, listing, vectors, constant, coeff)
        with _one_thread():
            write_shards(shards, plan.shard_metadata, tmp, save=safetensors_write.write_safetensors)
        if plan.indexed:
            write_index(tmp, shards, (listing.index or {}).get("metadata"))
        timings["write"] = time.perf_counter() - t
        t = time.perf_counter()
        config_dict = edited_config(folder, plan.untie, placement.config if placement else None)
        write_json(tmp / "config.json", config_dict)
        copied, skipped = copy_side_files(folder, tmp)
        report = BakeReport(
            output=str(out),
            model_type=layout.model_type,
            d_model=layout.d_model,
            n_layers=layout.n_layers,
            direction_digest=d.digest,
            layer=d.layer,
            position=d.position,
            mode=d.mode,
            alpha=d.alpha,
            selector=d.selector,
            embeddings=embeddings,
            tied=layout.tied,
            untied=plan.untie,
            edits=plan.counts(),
            writers=plan.writers(),
            embeddings_edited=plan.embeddings_edited(),
            files=sorted(plan.shards),
            bytes_written=sum((tmp / f).stat().st_size for f in plan.shards),
            largest_source_file=listing.largest_file_bytes(),
            warnings=plan.warnings,
            timings=timings,
            copied=copied,
            skipped=skipped,
        )
        report.constant = placement.note if placement else ""
        base = base_model_id(src, config_dict, d)
        (tmp / CARD_FILE).write_text(model_card(report, plan, src.spec, base), encoding="utf-8")
        manifest(tmp, stage="bake", source=record, extra=_manifest_extra(report, d, scores, plan))
        timings["finish"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return report


def _add_constant(plan: BakePlan, placement: ConstantPlacement) -> None:
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


def _manifest_extra(report: BakeReport, d: Direction, scores: dict | None, plan: BakePlan) -> dict:
    return {
        "direction": d.record(),
        "scores": scores,
        "bake": {
            "embeddings": report.embeddings,
            "untied": report.untied,
            "edits": report.edits,
            "writers": report.writers,
            "embeddings_edited": report.embeddings_edited,
            "mode": report.mode,
            "alpha": report.alpha,
            "constant": report.constant,
            "post_norm_gains": dict(sorted(plan.gains.items())),
            "gain_offset": plan.gain_offset,
            "warnings": report.warnings,
            "tool_version": __version__,
        },
    }
