"""The direction artifact: what ``select`` hands to ``eval``, ``bake`` and ``verify``.

``RUN_DIR/direction.safetensors`` holds tensors ``direction`` (the unnormalised difference in means
at the chosen position and layer, ``[d_model]``, float64) and ``reference`` (the harmless mean
there), optionally ``strengths`` (``[n_layers + 1]``: the removal's weight at the embedding, then
at each block's writers; absent means 1 everywhere), with string metadata ``layer``, ``position``,
``mode``, ``selector``, ``alpha`` and the source model's hash, so a direction cannot silently be
applied to another model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cosmic_bake import __version__
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.file_hashes import file_sha256
from cosmic_bake.model.hooks import BAKED_MODES
from cosmic_bake.outputs import read_json, sha256_bytes

DIRECTION_FILE = "direction.safetensors"
SELECTION_FILE = "selection.json"


@dataclass
class Direction:
    """A chosen refusal direction and where it came from."""

    direction: torch.Tensor  # [d_model] float64, unnormalised
    reference: torch.Tensor  # [d_model] float64, harmless mean at (position, layer)
    layer: int
    position: int
    mode: str = "ablate"
    selector: str = "cosmic"
    alpha: float = 0.0
    model_id: str = ""
    model_hash: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    strengths: torch.Tensor | None = None  # [n_layers + 1] float64, mode ablate only; None: 1 everywhere

    def coeff(self, block: int | None) -> float:
        """The projection coefficient baked into a tensor: ``W <- (I - k u u^T) W``.

        ``block`` None is the embedding (block 0's input), else the block whose writer it is.
        ``ablate``: 1, or the direction's strength there; ``scale``: ``-alpha``; the constant
        modes remove at full strength.
        """
        if self.mode == "scale":
            return -self.alpha
        if self.mode == "ablate" and self.strengths is not None:
            return float(self.strengths[0 if block is None else block + 1])
        return 1.0

    @property
    def digest(self) -> str:
        """SHA-256 of the direction's float64 bytes: names this exact direction in manifests."""
        return sha256_bytes(self.direction.double().contiguous().numpy().tobytes())

    def with_mode(self, mode: str | None, alpha: float | None) -> Direction:
        """This direction with the baked mode and alpha the user chose (default: its own)."""
        return dataclasses.replace(self, mode=mode or self.mode, alpha=self.alpha if alpha is None else float(alpha))

    def hook(self):
        """The runtime hook a checkpoint baked from this direction equals (``Intervention``)."""
        from cosmic_bake.model.hooks import baked_hook

        return baked_hook(self.mode, self.direction, self.reference, self.layer, self.alpha, self.strengths)

    def record(self) -> dict:
        """What a manifest says about this direction (enough to find and check the artifact)."""
        return {
            "sha256_float64": self.digest,
            "layer": self.layer,
            "position": self.position,
            "mode": self.mode,
            "selector": self.selector,
            "alpha": self.alpha,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            **({} if self.strengths is None else {"strengths": [round(float(x), 6) for x in self.strengths]}),
            **self.extra,
        }

    def save(self, folder: Path) -> Path:
        meta = {
            "layer": str(self.layer),
            "position": str(self.position),
            "mode": self.mode,
            "selector": self.selector,
            "alpha": repr(float(self.alpha)),
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "tool_version": __version__,
            **self.extra,
        }
        path = Path(folder) / DIRECTION_FILE
        tensors = {"direction": self.direction.double().contiguous(), "reference": self.reference.double().contiguous()}
        if self.strengths is not None:
            tensors["strengths"] = self.strengths.double().contiguous()
        save_file(
            tensors,
            str(path),
            metadata=meta,
        )
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> Direction:
        """Read a run folder (or the ``.safetensors`` file itself) with clear errors."""
        path = Path(run_dir)
        if path.is_dir():
            path = path / DIRECTION_FILE
        if not path.is_file():
            raise CosmicBakeError(f"no direction found at {path}", "run 'cosmic-bake select ... -o RUN_DIR' first")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise CosmicBakeError(f"{path} is not a readable direction file ({err})", "run select again") from err
        if "direction" not in tensors or "layer" not in meta:
            raise CosmicBakeError(f"{path} lacks the direction tensor or its layer", "run select again")
        known = {"layer", "position", "mode", "selector", "alpha", "model_id", "model_hash", "tool_version"}
        return cls(
            direction=tensors["direction"].double(),
            reference=tensors.get("reference", torch.zeros_like(tensors["direction"])).double(),
            layer=int(meta["layer"]),
            position=int(meta.get("position", "-1")),
            mode=meta.get("mode", "ablate"),
            selector=meta.get("selector", "cosmic"),
            alpha=float(meta.get("alpha", "0.0")),
            model_id=meta.get("model_id", ""),
            model_hash=meta.get("model_hash", ""),
            extra={k: v for k, v in meta.items() if k not in known},
            strengths=tensors["strengths"].double() if "strengths" in tensors else None,
        )


def model_hash(source_rec: dict) -> str:
    """One hash naming the source model: of its files' hashes, in name order."""
    files = source_rec.get("files") or {}
    if not files:
        return f"hub:{source_rec.get('hub_id')}@{source_rec.get('revision') or 'main'}"
    return sha256_bytes("".join(f"{k}:{v};" for k, v in sorted(files.items())).encode())


def source_record(source, record_paths: bool = False) -> dict:
    """Where the model came from, portably: Hub id and revision, else file names, sizes and SHA-256s.

    The record goes into manifests that are uploaded with the output, so it names the source by
    what anyone can check against their own copy, never by the folder it sits in on this
    machine; ``record_paths`` adds the spec as typed and the local path (the user asked for them).
    """
    from cosmic_bake.sharing import portable_name

    rec: dict = {"name": portable_name(source.spec), "kind": source.kind}
    if source.hub_id:
        rec.update(hub_id=source.hub_id, revision=source.revision)
    files = source.files
    rec["files"] = {p.name: file_sha256(p) for p in files}  # read once per machine (file_hashes)
    rec["sizes"] = {p.name: p.stat().st_size for p in files}
    if record_paths:
        rec["spec"] = source.spec
        if source.path is not None:
            rec["path"] = str(Path(source.path).expanduser().resolve())
    return rec


def check_direction(direction: Direction, d_model: int, source_hash: str, allow_mismatch: bool) -> None:
    if direction.mode == "ace":
        raise CosmicBakeError(
            "ACE applied at one layer cannot be carried by weights exactly",
            "select with --mode affine (its bakeable form), or bake with --mode affine",
        )
    if direction.mode not in BAKED_MODES:
        raise CosmicBakeError(f"cannot bake mode '{direction.mode}'", f"use one of {', '.join(BAKED_MODES)}")
    size = direction.direction.numel()
    if direction.direction.ndim != 1 or size != d_model:
        raise CosmicBakeError(
            f"the direction has {size} values but the model's hidden size is {d_model}",
            "use a direction selected on this model",
        )
    if direction.model_hash and direction.model_hash != source_hash and not allow_mismatch:
        raise CosmicBakeError(
            f"the direction was selected on another model ({direction.model_id or 'unknown'}, "
            f"hash {direction.model_hash[:12]}) than the one being baked (hash {source_hash[:12]})",
            "select a direction on this model, or pass --allow-mismatch if it is the same weights in another file",
        )


def load_direction(direction: Direction | str | Path) -> tuple[Direction, dict | None]:
    """The direction, and the chosen scores of the selection.json beside it, when given as a path."""
    if isinstance(direction, Direction):
        return direction, None
    path = Path(direction)
    d = Direction.load(path)
    sel = (path if path.is_dir() else path.parent) / SELECTION_FILE
    scores = None
    if sel.is_file():  # scores are informational: a broken selection.json is one clear line all the same
        scores = read_json(sel, "re-run select, or restore the run folder's selection.json").get("chosen_scores")
    return d, scores


def gguf_provenance(
    d: Direction, source_hash: str, extra: dict | None = None, source_name: str | None = None
) -> dict[str, str | int]:
    """The ``cosmic_bake.*`` metadata keys every baked GGUF carries.

    ``cosmic_bake.source_model`` is ``source_name`` (the source record's portable name: Hub id,
    ``builtin:NAME`` or file name); a direction saved before names were portable may hold a path
    as its ``model_id``, which is reduced to its file name here.
    """
    from cosmic_bake.sharing import portable_name

    return {
        "cosmic_bake.version": __version__,
        "cosmic_bake.mode": d.mode,
        "cosmic_bake.alpha": float(d.alpha),
        "cosmic_bake.direction_sha256": d.digest,
        "cosmic_bake.layer": int(d.layer),
        "cosmic_bake.position": int(d.position),
        "cosmic_bake.selector": d.selector,
        "cosmic_bake.source_model": source_name or (portable_name(d.model_id) if d.model_id else ""),
        "cosmic_bake.source_hash": source_hash,
        **(extra or {}),
    }


def baked_settings(baked: str) -> tuple[str, float] | None:
    """(mode, alpha) a baked folder's manifest or a baked GGUF's metadata records, if any."""
    from pathlib import Path

    from cosmic_bake.outputs import read_json

    path = Path(baked)
    if path.suffix.lower() == ".gguf" and path.is_file():
        from cosmic_bake.export.gguf_io import read_metadata

        keys = read_metadata(path, "cosmic_bake.")
        mode = keys.get("cosmic_bake.mode")
        return (str(mode), float(keys.get("cosmic_bake.alpha", 0.0))) if mode else None
    manifest = path / "manifest.json"
    if manifest.is_file():
        fix = "restore the manifest.json the bake wrote, or bake the folder again"
        bake = read_json(manifest, fix).get("bake") or {}
        if not isinstance(bake, dict):
            raise CosmicBakeError(f"{manifest}: its 'bake' entry is not an object", fix)
        if "mode" in bake:
            try:
                return str(bake["mode"]), float(bake.get("alpha") or 0.0)
            except (TypeError, ValueError) as err:
                raise CosmicBakeError(f"{manifest}: the bake's alpha is not a number", fix) from err
    return None
