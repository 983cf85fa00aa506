"""The unedited model as a GGUF of the same type as a baked one: what verify's relative gate measures.

A quantized file differs from the float model by its rounding, and for 4-6 bit types that
rounding can be as large as the edit. Only a comparison with the *unedited* model stored the same
way shows whether a baked file carries the edit: verify requires the baked file to sit much closer
to the hook than this reference does (:data:`cosmic_bake.verify.logits.RATIO_MAX`).

The reference costs little:

- GGUF -> GGUF bakes (source types, ``--edited-type-always``) and llama.cpp LoRA adapters: the
  source GGUF itself;
- ``--outtype T`` bakes (and files with no manifest): the unedited float model converted and
  quantized to ``T`` once (as ``bake`` writes ``T``: :func:`cosmic_bake.export.gguf_export.write_gguf`),
  kept in the cache folder under the source's hash and reused.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export import ggml_quant

REFERENCE_DIR = "unedited"


def reference_cache() -> Path:
    """Where unedited references are kept: beside the builtin models' cache (``COSMIC_BAKE_MODELS``)."""
    from cosmic_bake.model.builtin import cache_dir

    return cache_dir() / REFERENCE_DIR


def baked_outtype(baked: Path) -> tuple[str | None, str | None]:
    """``(route, outtype)`` of a baked GGUF: its sidecar manifest's, else the file type in its header.

    ``route`` is ``gguf-to-gguf`` (source types kept), ``safetensors-to-gguf`` or None (no manifest).
    """
    from cosmic_bake.bake.gguf import manifest_path
    from cosmic_bake.export.gguf_io import read_metadata

    sidecar = manifest_path(baked)
    if sidecar.is_file():
        from cosmic_bake.outputs import read_json

        bake = read_json(sidecar, "re-bake the GGUF, or delete its broken .manifest.json").get("bake") or {}
        route = bake.get("route")
        if route == "gguf-to-gguf":
            return route, None
        if route and bake.get("outtype"):
            return route, str(bake["outtype"])
    ftype = read_metadata(baked, "general.file_type").get("general.file_type")
    names = {int(v): k for k, v in ggml_quant.FILE_TYPES.items()}
    return None, names.get(int(ftype)) if ftype is not None else None


def unedited_gguf(original: str, source, baked: Path) -> tuple[Path, dict]:
    """``(path, record)`` of the unedited model stored like ``baked``; the record goes in the report.

    ``original`` is the model spec verify was given and ``source`` its resolved
    :class:`~cosmic_bake.model.loading.ModelSource`.
    """
    route, outtype = baked_outtype(baked)
    if source.kind == "gguf" and route != "safetensors-to-gguf":  # source types (no manifest: assumed)
        return source.path, {"kind": "source GGUF", "file": source.path.name}
    if outtype is None:
        raise CosmicBakeError(
            f"cannot tell which type {baked.name} was written as (no manifest, unknown general.file_type)",
            "verify a GGUF written by cosmic-bake, or keep its .manifest.json beside it",
        )
    return cached_reference(original, outtype)


def cached_reference(original: str, outtype: str) -> tuple[Path, dict]:
    """The unedited ``original`` as an ``outtype`` GGUF, made once (convert, then llama.cpp's quantizer)."""
    from cosmic_bake.artifacts import model_hash, source_record
    from cosmic_bake.export.gguf_export import write_gguf
    from cosmic_bake.model.loading import source_folder

    source, folder = source_folder(original)
    key = model_hash(source_record(source)).replace(":", "_").replace("/", "_").replace("@", "_")[:40]
    target = reference_cache() / f"{key}-{outtype}.gguf"
    record = {"kind": f"unedited model as {outtype}", "file": target.name, "outtype": outtype, "cached": True}
    if target.is_file():
        return target, record
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.work-", dir=target.parent) as work:
        final = Path(work) / "final.gguf"
        write_gguf(folder, final, outtype)  # q8_0 and float types directly; others via a float file
        os.replace(final, target)
    return target, {**record, "cached": False}
