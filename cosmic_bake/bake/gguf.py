"""``bake --format gguf``: pick the route, write the file atomically, and its manifest beside it.

GGUF sources keep their quantization (:func:`~cosmic_bake.bake.gguf_edit.bake_gguf_file` edits the
few tensors the edit touches); anything else, or an explicit ``--outtype``, is planned as a
safetensors bake (:func:`~cosmic_bake.bake.folder.prepare_bake`) whose edited tensors stream
straight into the GGUF converter (:mod:`cosmic_bake.export.gguf_export`: float types and q8_0
directly, other types through a float file in the source's precision and llama.cpp's quantizer).
The output is written to a temporary file beside ``OUT.gguf`` and renamed into place only when
complete, manifest first.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from cosmic_bake.artifacts import Direction, gguf_provenance
from cosmic_bake.bake.gguf_edit import bake_gguf_file
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export import ggml_quant
from cosmic_bake.settings.groups import BakeOptions


def temp_path(target: Path) -> Path:
    """A fresh temporary file beside ``target`` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(fd)
    return Path(name)


def _manifest(
    out: Path,
    written: Path,
    record: dict,
    d: Direction,
    scores: dict | None,
    bake: dict,
    lin,
    record_paths: bool,
    settings: dict | None,
) -> dict:
    """The manifest of ``out``, whose bytes are (still) at ``written``; portable unless ``record_paths``."""
    from cosmic_bake.outputs import environment, sha256_file
    from cosmic_bake.sharing import portable

    return {
        "tool": "cosmic-bake",
        "stage": "bake",
        "format": "gguf",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": environment(),
        "record_paths": record_paths,
        "source_model": portable(record, record_paths),
        "lineage": lin.record(),
        "direction": portable(d.record(), record_paths),
        "scores": scores,
        "bake": portable(bake, record_paths),
        "settings": portable(settings, record_paths),
        "files": {out.name: sha256_file(written)},
    }


def manifest_path(out: Path) -> Path:
    """The manifest written beside a baked GGUF file: ``OUT.gguf.manifest.json``."""
    from cosmic_bake.outputs import gguf_manifest_path

    return gguf_manifest_path(out)


def bake_to_gguf(
    model: str,
    run_dir: Path,
    out: Path,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    settings: dict | None = None,
    **options,
) -> dict:
    """Bake ``run_dir``'s direction into ``model`` and write ``out`` (a .gguf file) plus its manifest.

    ``options`` are :class:`~cosmic_bake.settings.BakeOptions` fields, checked as the CLI checks
    them (``max_shard_size`` does not apply to a single file). ``outtype`` None keeps a GGUF
    source's tensor types (only edited tensors are re-quantized);
    for other sources it means f16. Returns the bake section of the manifest. ``out`` (and its
    manifest) may not be, contain or lie inside the model, ``run_dir`` or ``inputs``; ``force``
    replaces only a GGUF that cosmic-bake baked (:func:`cosmic_bake.outputs.check_target`).
    ``settings`` (the bake command's, serialised) goes into the manifest.
    The file's ``general.name`` says it is edited and its base-model keys name the source
    (``base_model``, a Hub id, when the source does not say it); the manifest names the source by
    Hub id or file name, size and hash unless ``record_paths``.
    """
    from cosmic_bake.artifacts import check_direction, load_direction, model_hash, source_record
    from cosmic_bake.export.lineage import gguf_identity, lineage
    from cosmic_bake.model.loading import model_inputs, resolve, source_folder
    from cosmic_bake.outputs import check_target, replace_file, write_json
    from cosmic_bake.sharing import share_modes

    o = BakeOptions.build(**options)
    outtype, embeddings, force, record_paths = o.outtype, o.embeddings, o.force, o.record_paths
    out = Path(out)
    inputs = [*model_inputs(model), Path(run_dir), *inputs]
    real = check_target(out, force=force, inputs=inputs, kind="gguf")
    if out.suffix.lower() != ".gguf":
        raise CosmicBakeError(f"-o {out} does not end in .gguf", "name the output file like model-baked.gguf")
    if outtype is not None:
        ggml_quant.file_type(outtype)
    ggml_quant.tensor_type(o.edited_type)
    source = resolve(model)
    inputs += [source.path] if source.path is not None else []
    d, scores = load_direction(run_dir)
    d = d.with_mode(o.mode, o.alpha)
    record = source_record(source, record_paths)
    shash = model_hash(record)
    check_direction(d, d.direction.numel(), shash, o.allow_mismatch)
    folder = None if source.kind == "gguf" else source_folder(model)[1]
    lin = lineage(source, base_model=o.base_model, folder=folder, model_id=d.model_id)
    identity = gguf_identity(lin, d.mode, d.alpha)
    t0 = time.perf_counter()
    tmp = temp_path(real)  # beside the real file (a symlinked -o included): the rename stays on one filesystem
    tmp_manifest = temp_path(manifest_path(real))
    try:
        if source.kind == "gguf" and outtype is None:
            report = bake_gguf_file(
                source.path,
                d,
                tmp,
                source_hash=shash,
                edited_type=o.edited_type,
                edited_type_always=o.edited_type_always,
                embeddings=embeddings,
                identity=identity,
                source_name=record["name"],
            )
            bake = {"route": "gguf-to-gguf", **report.to_dict()}
        else:
            folder = folder or source_folder(model)[1]
            bake = _bake_via_safetensors(
                folder, source, d, tmp, outtype or "f16", shash, embeddings, identity, record["name"]
            )
        bake["embeddings"] = embeddings
        bake["output"] = str(out) if record_paths else out.name
        bake["seconds"] = time.perf_counter() - t0
        write_json(tmp_manifest, _manifest(real, tmp, record, d, scores, bake, lin, record_paths, settings))
        share_modes(tmp)  # mkstemp made it private; the finished file gets what open() would give
        real = check_target(out, force=force, inputs=inputs, kind="gguf")  # again: the bake took a while
        os.replace(tmp_manifest, manifest_path(real))
        replace_file(tmp, real)
    finally:
        for p in (tmp, tmp_manifest):
            p.unlink(missing_ok=True)
    return bake


def _bake_via_safetensors(
    folder: Path,
    source,
    d: Direction,
    out: Path,
    outtype: str,
    shash: str,
    embeddings: str,
    identity: dict,
    source_name: str,
) -> dict:
    """transformers folder -> GGUF ``out``, the bake's edited tensors streamed into the converter.

    No baked safetensors folder is written: the converter reads each tensor from the bake's plan
    (copied, or edited when its turn comes). Float types and q8_0 are written directly; other
    quantized types go through a float GGUF in the source's precision and llama.cpp's quantizer
    (:mod:`cosmic_bake.export.gguf_export`). The side folder holds only the edited config.json and
    the tokenizer files the converter reads. ``identity`` is the GGUF's ``general.name`` and
    base-model keys; the temporary side folder would otherwise name it.
    """
    from cosmic_bake.bake.apply import copy_side_files, one_thread
    from cosmic_bake.bake.folder import prepare_bake
    from cosmic_bake.export.gguf_export import write_gguf
    from cosmic_bake.outputs import write_json

    timings = {}
    t = time.perf_counter()
    prep = prepare_bake(folder, d, BakeOptions.build(embeddings=embeddings, allow_mismatch=True), source=source)
    tensors = {name: src for shard in prep.shards().values() for name, src in shard.items()}
    timings["plan"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as work:
        side = Path(work)
        write_json(side / "config.json", prep.config)
        copy_side_files(folder, side)
        t = time.perf_counter()
        keys = dict(identity)
        name = keys.pop("general.name", None)
        meta = {**gguf_provenance(d, shash, source_name=source_name), **keys}
        with one_thread():
            conv, route = write_gguf(side, out, outtype, metadata=meta, tensors=tensors, name=name)
        timings["bake_convert_quantize"] = time.perf_counter() - t
    return {
        "route": "safetensors-to-gguf",
        "outtype": outtype,
        "architecture": conv.arch,
        "edits": prep.plan.counts(),
        "untied": prep.plan.untie,
        "warnings": prep.plan.warnings + list(conv.warnings),
        "bytes_written": out.stat().st_size,
        "timings": timings,
        "conversion": route,
    }
