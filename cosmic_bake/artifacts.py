"""The direction artifact: what ``select`` hands to ``eval``, ``bake`` and ``verify``.

``RUN_DIR/direction.safetensors`` holds tensors ``direction`` (the unnormalised difference in means
at the chosen position and layer, ``[d_model]``, float64) and ``reference`` (the harmless mean
there), with string metadata ``layer``, ``position``, ``mode``, ``selector``, ``alpha`` and the
source model's hash, so a direction cannot silently be applied to another model.
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
from cosmic_bake.outputs import sha256_bytes

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

        return baked_hook(self.mode, self.direction, self.reference, self.layer, self.alpha)

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
        save_file(
            {"direction": self.direction.double().contiguous(), "reference": self.reference.double().contiguous()},
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
        )
