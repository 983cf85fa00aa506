"""The weight-space check's report (per tensor, per class), and what was baked (mode, alpha, embeddings)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cosmic_bake.artifacts import Direction
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.verify.weights_math import (
    CLASSES,
    K_ALLOWANCE,
    RESIDUAL_BOUND,
    STATUSES,
    UnitResult,
    worst,
)


@dataclass
class TensorResult:
    """One edited tensor: its class, types and its worst unit's figures."""

    name: str
    cls: str
    source_type: str  # "(new)" for a bias the bake adds
    stored_type: str  # "(missing)" where the output lacks a bias the bake adds
    units: int
    residual: float
    ratio: float
    status: str


@dataclass
class ClassRow:
    """Tensors of one class stored as one type; passes when none fails and one shows the edit."""

    cls: str
    stored_type: str
    n_tensors: int
    n_failed: int
    n_unresolved: int
    max_residual: float
    max_ratio: float
    passed: bool


@dataclass
class WeightCheck:
    """The weight-space check of one baked output, per tensor class and stored type."""

    format: str  # "hf" | "gguf"
    mode: str
    alpha: float
    source: str
    baked: str
    rows: list[ClassRow]
    tensors: list[TensorResult] = field(default_factory=list)
    k: float = K_ALLOWANCE
    residual_bound: float = RESIDUAL_BOUND
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every class passes (and at least one tensor was checked)."""
        return bool(self.rows) and all(r.passed for r in self.rows)

    def to_dict(self, tensors: int = 20) -> dict:
        """JSON-ready (non-finite numbers as null); the ``tensors`` worst tensors are listed."""
        listed = sorted(self.tensors, key=lambda t: (-STATUSES.index(t.status), -_finite_or(t.ratio, 1e300)))
        return _json_safe(
            {
                "passed": self.passed,
                "format": self.format,
                "mode": self.mode,
                "alpha": self.alpha,
                "source": self.source,
                "baked": self.baked,
                "k": self.k,
                "residual_bound": self.residual_bound,
                "n_tensors": len(self.tensors),
                "classes": [asdict(r) for r in self.rows],
                "worst_tensors": [asdict(t) for t in listed[:tensors]],
                "notes": self.notes,
            }
        )

    def lines(self) -> list[str]:
        """A small table for the command line."""
        head = ("class", "type", "tensors", "failed", "unres.", "max resid.", "max ratio")
        out = ["{:<12} {:<8} {:>7} {:>6} {:>6} {:>10} {:>9}".format(*head)]
        for r in self.rows:
            out.append(
                f"{r.cls:<12} {r.stored_type:<8} {r.n_tensors:>7} {r.n_failed:>6} {r.n_unresolved:>6} "
                f"{r.max_residual:>10.3g} {r.max_ratio:>9.3g}  {'pass' if r.passed else 'FAIL'}"
            )
        return out


def _finite_or(x: float, default: float) -> float:
    return x if math.isfinite(x) else default


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def class_rows(results: list[TensorResult]) -> list[ClassRow]:
    """Per (class, stored type): counts, worst residual and ratio, and whether the class passes."""
    groups: dict[tuple[str, str], list[TensorResult]] = {}
    for t in results:
        groups.setdefault((t.cls, t.stored_type), []).append(t)
    rows = []
    for (cls, stype), ts in sorted(groups.items(), key=lambda kv: (CLASSES.index(kv[0][0]), kv[0][1])):
        failed = sum(t.status == "fail" for t in ts)
        unresolved = sum(t.status == "unresolved" for t in ts)
        rows.append(
            ClassRow(
                cls,
                stype,
                len(ts),
                failed,
                unresolved,
                max(t.residual for t in ts),
                max(t.ratio for t in ts),
                failed == 0 and unresolved < len(ts),
            )
        )
    return rows


_FLOAT_TYPES = ("F64", "F32", "F16", "BF16")


def class_notes(results: list[TensorResult], embeddings: str) -> list[str]:
    """What the figures mean where a reader would ask: skipped embeddings, edits rounded away."""
    notes = []
    if embeddings == "skip":
        notes.append("embeddings skipped by the bake: the embedding is not checked")
    regrid = sorted(
        {
            f"{t.source_type} -> {t.stored_type}"
            for t in results
            if t.status == "fail" and t.residual < 0.9 and {t.source_type, t.stored_type}.isdisjoint(_FLOAT_TYPES)
        }
    )
    if regrid:
        notes.append(
            f"edited tensors rounded from a quantized source to a quantized type ({', '.join(regrid)}) keep part "
            "of the component: the source weights sit on a grid, and nearest rounding puts a weight the edit moved "
            "by less than half a step back where it was; store edited tensors as q8_0 (--edited-type-always), or "
            "bake from the float model"
        )
    return notes


def tensor_result(name: str, cls: str, source_type: str, stored_type: str, units: list[UnitResult]) -> TensorResult:
    return TensorResult(
        name,
        cls,
        source_type,
        stored_type,
        len(units),
        max(u.residual for u in units),
        max(u.ratio for u in units),
        worst(u.status for u in units),
    )


def baked_direction(direction: Direction | str | Path, settings: tuple[str, float] | None) -> Direction:
    """The direction with the mode and alpha the baked output records (if it records them)."""
    d = direction if isinstance(direction, Direction) else Direction.load(direction)
    return d.with_mode(*settings) if settings is not None else d


def gguf_settings(reader) -> tuple[str, float] | None:
    """(mode, alpha) a baked GGUF records, as :func:`cosmic_bake.artifacts.baked_settings` reads them.

    Read from the reader already open: parsing a GGUF header with a large vocabulary takes
    seconds, so each file is opened once.
    """
    from cosmic_bake.export.gguf_io import field_value

    mode = field_value(reader, "cosmic_bake.mode")
    return (str(mode), float(field_value(reader, "cosmic_bake.alpha", 0.0))) if mode else None


def _manifest_bake(baked: Path) -> dict:
    """The ``bake`` section of the manifest written with a baked folder or GGUF (empty if none)."""
    path = baked / "manifest.json" if baked.is_dir() else baked.with_name(baked.name + ".manifest.json")
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("bake") or {}
    except (OSError, ValueError):
        return {}


def baked_embeddings(baked: Path, embeddings: str | None) -> str:
    return embeddings or str(_manifest_bake(baked).get("embeddings") or "untie")


def check_size(d: Direction, d_model: int) -> None:
    if d.direction.numel() != d_model:
        raise CosmicBakeError(
            f"the direction has {d.direction.numel()} values but the model's hidden size is {d_model}",
            "use the direction the model was baked with",
        )
