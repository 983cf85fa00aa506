"""Bake a transformers checkpoint folder: plan, stream the edited shards out, write config, card and manifest.

:func:`bake_folder` is the entry point (``api.bake`` with ``format="hf"``, and the first half of
``format="gguf"`` from a folder). Each output shard is streamed out by
:func:`~cosmic_bake.export.safetensors_write.write_safetensors`; see :mod:`cosmic_bake.bake` for the method.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cosmic_bake import __version__
from cosmic_bake.artifacts import Direction, check_direction, load_direction, source_record
from cosmic_bake.bake.apply import copy_side_files, edit_vectors, edited_config, one_thread, shard_sources
from cosmic_bake.bake.constant import place_constant
from cosmic_bake.bake.plan import BakePlan, add_constant, plan_bake
from cosmic_bake.errors import CosmicBakeError, first_line
from cosmic_bake.export import safetensors_write
from cosmic_bake.export.card import CARD_FILE, model_card
from cosmic_bake.export.lineage import lineage
from cosmic_bake.export.safetensors_read import (
    list_weights,
    parse_size,
)
from cosmic_bake.export.safetensors_write import write_index, write_shards
from cosmic_bake.math.projections import unit
from cosmic_bake.model.layout import model_layout, text_config
from cosmic_bake.outputs import atomic_dir, check_target, manifest, write_json
from cosmic_bake.settings.groups import BakeOptions

# --------------------------------------------------------------------------------------------
# Plan: one edit per output tensor


# --------------------------------------------------------------------------------------------
# Apply


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


def load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - any config failure becomes one line
        raise CosmicBakeError(
            f"cannot read {folder}/config.json: {first_line(err)}", "pass a transformers model folder"
        ) from err


@dataclass
class PreparedBake:
    """Everything a bake decides before writing: the plan, and per output shard where each tensor comes from.

    :func:`bake_folder` writes it as a safetensors folder; a GGUF bake streams the same tensors
    into the converter instead (no baked folder on disk, see :mod:`cosmic_bake.bake.gguf`).
    """

    folder: Path
    direction: Direction
    scores: dict | None
    plan: BakePlan
    listing: object  # safetensors_read.Listing
    layout: object  # layout.Layout
    placement: object | None  # constant.ConstantPlacement of an add / affine constant
    config: dict  # the output's config.json
    src: object  # the ModelSource recorded
    record: dict  # its source record (file hashes)
    lineage: object  # export.lineage.Lineage: the card's and the manifest's base model
    vectors: dict
    constant: object | None  # the constant tensor, divided by its placement's scale

    def shards(self) -> dict:
        """Per output shard file, ``{name: TensorSource}`` (edits are made when a writer reaches them)."""
        return shard_sources(self.plan, self.listing, self.vectors, self.constant, self.direction.coeff)


def prepare_bake(folder: Path, direction: Direction | str | Path, o: BakeOptions, source=None) -> PreparedBake:
    """Plan the bake of ``direction`` into ``folder`` (reads headers and norm gains only; writes nothing).

    ``o`` and ``source`` are :func:`bake_folder`'s options and source.
    """
    from cosmic_bake.artifacts import model_hash
    from cosmic_bake.model.loading import ModelSource

    d, scores = load_direction(direction)
    d = d.with_mode(o.mode, o.alpha)
    config = load_config(folder)
    d_model = int(getattr(text_config(config), "hidden_size", 0) or 0)
    src = source or ModelSource(str(folder), "folder", path=folder)
    record = source_record(src, o.record_paths)
    if src.kind == "gguf" and o.record_paths:
        record["baked_from"] = str(folder)
    lin = lineage(src, base_model=o.base_model, folder=folder, model_id=d.model_id)
    check_direction(d, d_model, model_hash(record), o.allow_mismatch)
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
        if placement.kind == "embedding" and o.embeddings == "skip":
            raise CosmicBakeError(
                "the constant of a layer-0 edit goes into the embedding, which --embeddings skip leaves alone",
                "drop --embeddings skip",
            )
    plan = plan_bake(
        layout,
        listing,
        embeddings=o.embeddings,
        max_shard_size=parse_size(o.max_shard_size),
        remove=d.mode != "add",
        embedding_changes=d.mode != "add" or (placement is not None and placement.kind == "embedding"),
    )
    constant = None
    if placement is not None:
        add_constant(plan, placement)
        constant = d.hook().constant() / placement.scale
    vectors = edit_vectors(plan, listing, unit(d.direction.double()))
    config_dict = edited_config(folder, plan.untie, placement.config if placement else None)
    return PreparedBake(
        folder, d, scores, plan, listing, layout, placement, config_dict, src, record, lin, vectors, constant
    )


# --------------------------------------------------------------------------------------------
# Entry point


def bake_folder(
    source_folder: str | Path,
    direction: Direction | str | Path,
    out: str | Path,
    *,
    source=None,
    inputs: Iterable[str | os.PathLike] = (),
    settings: dict | None = None,
    **options,
) -> BakeReport:
    """Bake linear removal of ``direction`` into the safetensors model in ``source_folder``; write ``out``.

    ``direction`` is a :class:`Direction` or a run folder (then its selection scores go into the
    manifest). ``options`` are :class:`~cosmic_bake.settings.BakeOptions` fields (``embeddings``,
    ``force``, ``max_shard_size``, ``allow_mismatch``, ``mode``, ``alpha``, ``base_model``,
    ``record_paths``; the GGUF-only ones are ignored), checked as the CLI checks them. ``source``
    is the :class:`~cosmic_bake.model.loading.ModelSource` the user named,
    when ``source_folder`` stands in for it (a GGUF's dequantized cache): the direction's model
    hash is checked against, and the manifest records, that source. ``max_shard_size`` reshards
    the output (default: the source's shard files, same names). ``mode`` / ``alpha`` override
    the artifact's (``ablate``, ``add``, ``affine``; see :func:`~cosmic_bake.model.hooks.baked_hook`
    for the hook each equals, :mod:`cosmic_bake.bake.constant` for where the constant goes).
    Returns a :class:`BakeReport`; its ``warnings`` say when the result differs from the hook.
    ``out`` may not be, contain or lie inside the source, the direction or ``inputs``; ``force``
    replaces only an earlier cosmic-bake output (:func:`cosmic_bake.outputs.check_target`).
    ``settings`` (the bake command's, serialised) goes into the manifest.
    ``base_model`` (a Hub id) names the card's base model when the source does not
    (:mod:`cosmic_bake.export.lineage`); ``record_paths`` writes local paths into the manifest
    (by default it names the source by Hub id or file name, size and hash, fit to upload).
    """
    t0 = time.perf_counter()
    o = BakeOptions.build(**options)
    folder = Path(source_folder)
    out = Path(out)
    if not (folder / "config.json").is_file():
        raise CosmicBakeError(f"{folder} has no config.json", "pass a transformers model folder or a .gguf file")
    inputs = [folder, *([source.path] if getattr(source, "path", None) else []), *inputs]
    if not isinstance(direction, Direction):
        inputs.append(Path(direction))
    check_target(out, force=o.force, inputs=inputs)
    prep = prepare_bake(folder, direction, o, source=source)
    d, scores, plan, listing, layout, placement = (
        prep.direction,
        prep.scores,
        prep.plan,
        prep.listing,
        prep.layout,
        prep.placement,
    )
    record, lin = prep.record, prep.lineage
    timings = {"plan": time.perf_counter() - t0}
    with atomic_dir(out, force=o.force, inputs=inputs) as tmp:
        t = time.perf_counter()
        shards = prep.shards()
        with one_thread():
            write_shards(shards, plan.shard_metadata, tmp, save=safetensors_write.write_safetensors)
        if plan.indexed:
            write_index(tmp, shards, (listing.index or {}).get("metadata"))
        timings["write"] = time.perf_counter() - t
        t = time.perf_counter()
        write_json(tmp / "config.json", prep.config)
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
            embeddings=o.embeddings,
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
        (tmp / CARD_FILE).write_text(model_card(report, plan, lin), encoding="utf-8")
        extra = {**_manifest_extra(report, d, scores, plan), "lineage": lin.record(), "settings": settings}
        manifest(tmp, stage="bake", source=record, extra=extra, record_paths=o.record_paths)
        timings["finish"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return report


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
