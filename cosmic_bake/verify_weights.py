"""Weight-space check of a bake (issue 13): the stored weights carry the edit, whatever the prompts.

``verify`` compares logits on prompts; this compares weights. For every tensor the bake edits,
the component of the *stored* weights (dequantized, for GGUF) along the edit's unit vector ``u``
must be what the baked mode prescribes, up to what rounding to the stored type leaves, and must
differ clearly from the unedited tensor's.

Each edited tensor is seen as a stack ``X [m, d]`` of residual-stream vectors (a writer ``W [d, k]``
gives its ``k`` columns, an embedding its rows, a bias itself); its component along ``u`` is
``c = X u``. Every baked mode changes a tensor only along ``u``, affinely:
``c_t = a c_o + b`` with

* ``a = 1 - k |v|^2`` where the tensor is projected with the bake's vector ``v`` (``r_hat``, or
  ``unit(g * r_hat)`` where a norm with gain ``g`` follows the writer) and coefficient ``k``
  (1: ``ablate`` / ``affine``; ``-beta``: ``scale``); ``a = 1`` where it is not (mode ``add``).
  ``|v|`` is not exactly 1 (``unit`` divides by ``|r| + 1e-8``), and taking the bake's own ``v``
  makes the prescription exact to float64, so float32 outputs are judged at float32 rounding.
* ``b = (constant . u) / s`` on the one tensor that carries an ``add`` / ``affine`` / ``scale``
  constant (embedding rows, divided by the embedding scale ``s``; or a bias), else 0.

Which tensors are edited, how (rows / cols / expert_rows / expert_cols / bias), with which vector
and where the constant goes comes from the bake's own planning (:func:`cosmic_bake.bake.plan_bake`,
:func:`cosmic_bake.bake_gguf.plan_edits`), not from a second reading of the layout.

Metric, per unit (one tensor; one expert of a stacked expert tensor), with ``X_t`` the target
(``X_o`` moved along ``u`` to ``c_t``) and ``E = X_b - X_t`` what the stored weights miss it by:

* ``deviation = |c_b - c_t|`` (2-norm over the unit's ``m`` vectors) = ``|E u|``;
* ``residual = deviation / |c_o - c_t|``: 0 for an exact edit, about 1 for no edit at all;
* ``rounding``: the edit must not change ``X`` across ``u``, so ``E (I - u u^T)`` is what rounding
  to the stored type left there. Rounding along ``u`` is estimated from it twice, and the larger
  taken: isotropically, ``|E (I - u u^T)|_F / sqrt(d - 1)``, and per
  coordinate, ``sqrt(sum_i u_i^2 S_i / (1 - sum_i u_i^4))`` with ``S_i`` coordinate ``i``'s
  squared orthogonal error summed over the unit. The second matters where rounding is not the
  same on every coordinate (float rounding scales with the value: real models have a few
  residual coordinates with much larger weights, and a refusal direction may lean on them); the
  ``1 - sum u^4`` undoes the part of ``S_i`` the projection removed (exact for equal rounding).
* ``allowance = K * rounding + eps``, ``eps = 1e-9 |X_t|_F / sqrt(d)`` (float64 arithmetic only;
  30x below float32 rounding).

A unit **passes** when ``deviation <= allowance`` and ``residual <= 0.5``; **fails** when
``deviation > allowance``; is **unresolved** when within the allowance but with ``residual > 0.5``,
i.e. the edit itself is under twice the allowance, so the stored type can show neither its
presence nor its absence. A tensor takes its worst unit's status; a class (per stored type)
passes when no tensor fails and at least one shows the edit, the check when every class passes.

Why ``K = 4``: for independent rounding errors ``E u`` is a sum of ``d`` small terms, close to
Gaussian, and ``deviation / rounding`` is ``sqrt(chi2_m / m)``: for a bias (``m = 1``, the worst
case) it exceeds 4 with probability 6e-5, for ``m >= 8`` below 1e-12; the rest of the margin
covers rounding that depends on the coordinate more than the per-coordinate estimate sees. A
missing edit deviates by ``|c_o - c_t|``, far beyond: removing the direction from a random
tensor changes its component by about ``|X|_F / sqrt(d)``, rounding by a fraction of that set by
the type's precision (float32 ~1e-7, bfloat16 ~3e-3, q8_0 ~1e-2, 4-bit ~0.1). Why residual 0.5:
the edit must have moved the component at least half way, beyond any plausible rounding.

An unedited file fails: ``X_b = X_o`` puts the whole prescribed change in ``E u`` and nothing
across ``u``, so the allowance collapses to ``eps`` (ratios ~1e9). A wrong direction, or Gemma's
gain left out of ``u``, fails: the component along ``u`` stays, and the change lands across ``u``
as one structured vector, which reads as rounding about ``sqrt(d - 1)`` times smaller than the
deviation (deviation / allowance measured about 2 at ``d = 64``, 4 at ``d = 256``; so for a single
bias vector at small ``d`` such a change may come out "unresolved" rather than "fail").

Quantized sources rounded again to a type of the same precision (``bake --format gguf`` with
source types; also ``--outtype q4_k_m`` from a Q4_1 GGUF): the source weights sit on a grid,
and where the edit moves a weight by less than half a step, nearest rounding puts it back. The
error is then the edit itself, along ``u``, not rounding: part of the component stays (4-bit at
``d = 256``: residual ~0.4; SmolLM2's Q4_1 writers, ``d = 576``: ~0.5), and this check fails
those tensors, as it should (their stored weights still write the direction);
``--edited-type-always`` (q8_0) keeps the edit (residual ~0.006). Finer types lose less (Q8_0 /
Q6_K re-rounded: residual ~0.01 / 0.05, within the allowance at these widths), but the loss
grows with ``d``.

Readers stream one tensor at a time (GGUF embeddings in row chunks): :func:`check_folder`
(transformers folders), :func:`check_gguf` (GGUF outputs, against the unedited GGUF or the
transformers folder they were converted from), and :func:`weight_check`, which picks one.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cosmic_bake.artifacts import Direction
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math.projections import unit

CLASSES = ("embedding", "attn_output", "mlp_down", "experts", "bias")
K_ALLOWANCE = 4.0
RESIDUAL_BOUND = 0.5
EPS = 1e-9
CHUNK_ELEMENTS = 1 << 20  # float64 elements per block of the math (8 MiB per temporary)
GGUF_ROW_CHUNK = 8192  # embedding rows dequantized at a time (as bake_gguf does)
STATUSES = ("pass", "unresolved", "fail")  # best to worst


# --------------------------------------------------------------------------------------------
# Pure math: tensors in, numbers out


@dataclass(frozen=True)
class Target:
    """What a baked mode prescribes for one tensor: ``c_t = scale * c_o + offset`` along unit ``u``."""

    u: torch.Tensor  # [d] float64, unit norm
    scale: float
    offset: float


def prescription(
    r_hat: torch.Tensor,
    v: torch.Tensor | None,
    coeff: float = 1.0,
    constant: torch.Tensor | None = None,
    divisor: float = 1.0,
) -> Target:
    """The target of a tensor projected with the bake's vector ``v`` (None: not projected).

    ``coeff`` is the bake's projection coefficient (1 removes, ``-beta`` scales by ``1 + beta``);
    ``constant`` the vector added to every row after the edit, stored divided by ``divisor``.
    """
    vec = (r_hat if v is None else v).to(torch.float64)
    u = vec / vec.norm()
    scale = 1.0 if v is None else 1.0 - coeff * float(vec @ vec)
    offset = 0.0 if constant is None else float(constant.to(torch.float64) @ u) / divisor
    return Target(u, scale, offset)


@dataclass
class Moments:
    """Sums over one unit's residual vectors that :func:`judge` needs (add chunks with ``+``)."""

    d: int
    m: int = 0
    dev2: float = 0.0  # sum (c_b - c_t)^2
    edit2: float = 0.0  # sum (c_o - c_t)^2
    orth2: float = 0.0  # |E (I - u u^T)|_F^2
    size2: float = 0.0  # |X_t|_F^2
    col2: torch.Tensor | None = None  # [d]: per coordinate, sum of squared orthogonal errors

    def __add__(self, other: Moments) -> Moments:
        cols = [c for c in (self.col2, other.col2) if c is not None]
        return Moments(
            self.d,
            self.m + other.m,
            self.dev2 + other.dev2,
            self.edit2 + other.edit2,
            self.orth2 + other.orth2,
            self.size2 + other.size2,
            sum(cols[1:], cols[0]) if cols else None,
        )


def moments(original: torch.Tensor, baked: torch.Tensor, target: Target) -> Moments:
    """The sums for residual vectors ``original`` / ``baked`` (``[m, d]``, any float dtype).

    Works in float64 blocks of about :data:`CHUNK_ELEMENTS`, so transposed views of large
    writers need no float64 copy of the whole tensor.
    """
    if original.shape != baked.shape or original.ndim != 2:
        raise ValueError(f"shapes {tuple(original.shape)} and {tuple(baked.shape)} are not one [m, d] pair")
    d = original.shape[1]
    u = target.u
    total = Moments(d, col2=torch.zeros(d, dtype=torch.float64))
    step = max(1, CHUNK_ELEMENTS // max(1, d))
    for a in range(0, original.shape[0], step):
        x_o = original[a : a + step].double()
        err = baked[a : a + step].double() - x_o  # becomes E = X_b - X_t below
        c_o = x_o @ u
        shift = (target.scale - 1.0) * c_o + target.offset  # c_t - c_o: X_t = X_o + shift u^T
        err -= torch.outer(shift, u)
        e_u = err @ u  # = c_b - c_t
        # per coordinate, sum of squares of E (I - u u^T), without forming it
        e_u2 = float(e_u.square().sum())
        col2 = err.square().sum(0) - 2.0 * u * (e_u @ err) + u.square() * e_u2
        size2 = float(x_o.square().sum() + (2.0 * shift * c_o + shift.square()).sum())
        total = total + Moments(d, x_o.shape[0], e_u2, float(shift.square().sum()), float(col2.sum()), size2, col2)
    return total


@dataclass(frozen=True)
class UnitResult:
    """One unit's figures: ``ratio`` is ``deviation / allowance``; see the module docstring."""

    deviation: float
    edit: float
    rounding: float
    allowance: float
    residual: float  # inf where no edit is prescribed along u but the component moved
    ratio: float
    status: str


def judge(mo: Moments, u: torch.Tensor, k: float = K_ALLOWANCE, bound: float = RESIDUAL_BOUND) -> UnitResult:
    """Pass / unresolved / fail for one unit's sums (thresholds justified in the module docstring)."""
    d = mo.d
    iso = math.sqrt(max(mo.orth2, 0.0) / max(1, d - 1))
    u2 = u.to(torch.float64).square()
    keep = max(1.0 - float(u2.square().sum()), 1.0 / d)
    per_coord = math.sqrt(max(float(u2 @ mo.col2), 0.0) / keep) if mo.col2 is not None else 0.0
    rounding = max(iso, per_coord)
    eps = EPS * math.sqrt(mo.size2 / d)
    allowance = k * rounding + eps
    dev, edit = math.sqrt(mo.dev2), math.sqrt(mo.edit2)
    if edit > 0:
        residual = dev / edit
    else:
        residual = 0.0 if dev <= eps else math.inf
    ratio = dev / allowance if allowance > 0 else (0.0 if dev == 0 else math.inf)
    if dev > allowance:
        status = "fail"
    elif residual <= bound:
        status = "pass"
    else:
        status = "unresolved"
    return UnitResult(dev, edit, rounding, allowance, residual, ratio, status)


def tensor_units(x: torch.Tensor, layout: str) -> list[torch.Tensor]:
    """A tensor's units as ``[m, d]`` stacks of residual vectors (views, no copies).

    ``layout``: ``rows`` ``[d, k]`` (columns are vectors), ``expert_rows`` ``[E, d, k]``,
    ``cols`` ``[n, d]`` (rows are vectors), ``expert_cols`` ``[E, n, d]``, ``bias`` ``[d]`` or
    ``[E, d]`` (one unit: a bias has too few values per expert for its own rounding estimate).
    """
    if layout == "rows":
        return [x.reshape(x.shape[0], -1).T]
    if layout == "expert_rows":
        return [w.reshape(w.shape[0], -1).T for w in x]
    if layout == "cols":
        return [x.reshape(-1, x.shape[-1])]
    if layout == "expert_cols":
        return list(x)
    if layout == "bias":
        return [x.reshape(-1, x.shape[-1])]
    raise ValueError(f"unknown tensor layout {layout!r}")


def check_tensor(original: torch.Tensor, baked: torch.Tensor, layout: str, target: Target) -> list[UnitResult]:
    """Judge every unit of one edited tensor (``original`` / ``baked`` of the same shape)."""
    if original.shape != baked.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(baked.shape)}")
    return [
        judge(moments(a, b, target), target.u)
        for a, b in zip(tensor_units(original, layout), tensor_units(baked, layout))
    ]


def worst(statuses: Iterable[str]) -> str:
    """The worst of some statuses (a tensor is as good as its worst expert)."""
    return max(statuses, key=STATUSES.index, default="pass")


# --------------------------------------------------------------------------------------------
# Report


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


def _notes(results: list[TensorResult], embeddings: str) -> list[str]:
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


def _result(name: str, cls: str, source_type: str, stored_type: str, units: list[UnitResult]) -> TensorResult:
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


# --------------------------------------------------------------------------------------------
# What was baked: the mode recorded in the output, the embedding handling from its manifest


def _direction(direction: Direction | str | Path, settings: tuple[str, float] | None) -> Direction:
    """The direction with the mode and alpha the baked output records (if it records them)."""
    d = direction if isinstance(direction, Direction) else Direction.load(direction)
    return d.with_mode(*settings) if settings is not None else d


def _gguf_settings(reader) -> tuple[str, float] | None:
    """(mode, alpha) a baked GGUF records, as :func:`cosmic_bake.verify.baked_settings` reads them.

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


def _embeddings(baked: Path, embeddings: str | None) -> str:
    return embeddings or str(_manifest_bake(baked).get("embeddings") or "untie")


def _coeff(d: Direction) -> float:
    return -d.alpha if d.mode == "scale" else 1.0


def _check_size(d: Direction, d_model: int) -> None:
    if d.direction.numel() != d_model:
        raise CosmicBakeError(
            f"the direction has {d.direction.numel()} values but the model's hidden size is {d_model}",
            "use the direction the model was baked with",
        )


# --------------------------------------------------------------------------------------------
# Transformers folders


def _hf_class(layout, edit) -> str:
    """Tensor class of a planned safetensors edit, from the bake's layout."""
    if edit.kind == "zeros":
        return "bias"
    role = layout.writers.get(layout.memory_name(edit.source))
    if role is None:
        return "embedding"
    if role.role == "bias":
        return "bias"
    if edit.kind.startswith("expert_") or "expert" in role.writer:
        return "experts"
    return "attn_output" if role.part == "attn" else "mlp_down"


def _read(folder: Path, info) -> torch.Tensor:
    from cosmic_bake.export.safetensors_read import read_tensor

    with open(folder / info.file, "rb") as fh:
        return read_tensor(fh, info)


def check_folder(
    source_folder: str | Path,
    baked_folder: str | Path,
    direction: Direction | str | Path,
    *,
    embeddings: str | None = None,
) -> WeightCheck:
    """Check a baked transformers folder against the folder it was baked from.

    ``embeddings`` (``untie`` / ``skip``) defaults to what the baked manifest records. The plan
    is the bake's own (:func:`~cosmic_bake.bake.plan_bake` with the constant placed as
    :func:`~cosmic_bake.bake.bake_folder` places it); tensors are read one at a time.
    """
    from cosmic_bake.bake import _add_constant, _load_config, edit_vectors, plan_bake
    from cosmic_bake.bake_constant import place_constant
    from cosmic_bake.export.safetensors_read import list_weights
    from cosmic_bake.model.layout import model_layout, text_config

    folder, baked = Path(source_folder), Path(baked_folder)
    from cosmic_bake.artifacts import baked_settings

    d = _direction(direction, baked_settings(str(baked)))
    config = _load_config(folder)
    _check_size(d, int(getattr(text_config(config), "hidden_size", 0) or 0))
    listing, out = list_weights(folder), list_weights(baked)
    layout = model_layout(config)
    placement = None
    if d.mode != "ablate":
        shapes = {n: (tuple(i.shape), i.dtype) for n, i in listing.tensors.items()}
        source_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        at = 0 if d.mode == "scale" else d.layer
        placement = place_constant(layout, shapes, source_config, at, layout.embed_scale)
    emb = _embeddings(baked, embeddings)
    plan = plan_bake(
        layout,
        listing,
        embeddings=emb,
        remove=d.mode != "add",
        embedding_changes=d.mode != "add" or (placement is not None and placement.kind == "embedding"),
    )
    if placement is not None:
        _add_constant(plan, placement)
    r_hat = unit(d.direction.double())
    vectors = edit_vectors(plan, listing, r_hat)
    constant = d.hook().constant() if placement is not None else None
    results = []
    for e in plan.edits():
        if e.kind in ("copy", "zeros") and not e.constant:
            continue
        if e.kind == "zeros":  # a new bias carrying the constant; missing from an unedited folder
            x_o, source_type = torch.zeros(e.shape, dtype=torch.float64), "(new)"
            info_b = out.tensors.get(e.name)
            stored_type = info_b.dtype if info_b is not None else "(missing)"
            x_b = _read(out.folder, info_b) if info_b is not None else x_o
        else:
            if e.name not in out.tensors:
                raise CosmicBakeError(
                    f"{baked} has no tensor {e.name}, which the bake writes", "pass the folder baked from this model"
                )
            info_b = out.tensors[e.name]
            x_b, stored_type = _read(out.folder, info_b), info_b.dtype
            info = listing.tensors[e.source]
            x_o, source_type = _read(listing.folder, info), info.dtype
        if x_o.shape != x_b.shape:
            raise CosmicBakeError(
                f"{e.name} has shape {list(x_b.shape)} in {baked} but {list(x_o.shape)} in the source",
                "pass the folder baked from this model",
            )
        projected = e.kind not in ("copy", "zeros")
        target = prescription(
            r_hat,
            vectors[e.vector] if projected else None,
            _coeff(d),
            constant if e.constant else None,
            placement.scale if (e.constant and placement is not None) else 1.0,
        )
        # where the constant rides on an unprojected tensor (mode add): the embedding's rows or a bias
        carrier = "cols" if placement is not None and placement.kind == "embedding" else "bias"
        shape_kind = {"zeros": "bias", "copy": carrier}.get(e.kind, e.kind)
        units = check_tensor(x_o, x_b, shape_kind, target)
        results.append(_result(e.name, _hf_class(layout, e), source_type, stored_type, units))
    rows, notes = class_rows(results), _notes(results, emb)
    return WeightCheck("hf", d.mode, d.alpha, str(folder), str(baked), rows, results, notes=notes)


# --------------------------------------------------------------------------------------------
# GGUF outputs

_GGUF_CLASSES = (
    (re.compile(r"\.bias$"), "bias"),
    (re.compile(r"^(token|position)_embd\.weight$"), "embedding"),
    (re.compile(r"\.attn_output\.weight$"), "attn_output"),
    (re.compile(r"\.ffn_down_(exps|shexp)(\.\d+)?\.weight$"), "experts"),
    (re.compile(r"\.ffn_down(\.\d+)?\.weight$"), "mlp_down"),
)
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")  # llama.cpp multiplies their embeddings by sqrt(n_embd)


def gguf_class(name: str) -> str:
    """Tensor class of an edited GGUF tensor, by llama.cpp's name."""
    for pattern, cls in _GGUF_CLASSES:
        if pattern.search(name):
            return cls
    raise ValueError(f"{name} is not a tensor the bake edits")


class _GgufTensors:
    """Float rows of a GGUF file's tensors, by name, in numpy layout (dims reversed from ``ne``)."""

    def __init__(self, path: Path) -> None:
        from cosmic_bake.export.gguf_io import open_gguf

        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.by_name = {t.name: t for t in self.reader.tensors}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self.by_name[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self.by_name[name].tensor_type.name

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor's 2-D row view, as float32."""
        from cosmic_bake.bake_gguf import _float_rows

        return _float_rows(self.by_name[name], start, stop)

    def gain(self, name: str) -> torch.Tensor:
        """A norm's stored gain (Gemma's ``+1`` included), as :func:`cosmic_bake.bake_gguf.edit_vectors` reads it."""
        return self.full(name).double().reshape(-1)

    def full(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        n_rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        return self.rows(name, 0, n_rows).reshape(shape)


class _ConvertedFolder:
    """A transformers folder seen through the GGUF converter's plan: GGUF names, numpy layout."""

    def __init__(self, folder: Path) -> None:
        from gguf import GGMLQuantizationType

        from cosmic_bake.export.gguf_convert import plan_tensors
        from cosmic_bake.export.gguf_hparams import read_hparams
        from cosmic_bake.export.safetensors_read import list_weights

        self.folder = Path(folder)
        self.hp = read_hparams(self.folder, [])
        self.listing = list_weights(self.folder)
        self.planned = {p.name: p for p in plan_tensors(self.hp, self.listing, GGMLQuantizationType.F32)}
        self._cached: tuple[str, torch.Tensor] | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.planned[name].shape)

    def type_name(self, name: str) -> str:
        sources = self.planned[name].sources
        return sources[0].dtype if sources else "F32"

    def full(self, name: str) -> torch.Tensor:
        """The tensor as the converter writes it before rounding (float32; experts stacked)."""
        from cosmic_bake.export.gguf_convert import _produce

        if self._cached is None or self._cached[0] != name:
            with contextlib.ExitStack() as files:
                data = _produce(self.planned[name], self.folder, {}, files)
            self._cached = (name, torch.from_numpy(np.array(data, dtype=np.float32)))
        return self._cached[1]

    def gain(self, name: str) -> torch.Tensor:
        """A norm's gain as the safetensors bake took it: float64, plus 1 for Gemma's ``1 + w``.

        (The converter writes ``1 + w`` rounded to float32; the bake's vector used it unrounded.)
        """
        from cosmic_bake.export.safetensors_read import read_tensor

        [info] = self.planned[name].sources
        with open(self.folder / info.file, "rb") as fh:
            g = read_tensor(fh, info).double().reshape(-1)
        return g + 1.0 if self.hp.arch in _GEMMA_ARCHS else g

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        x = self.full(name)
        return x.reshape(-1, x.shape[-1])[start:stop]

    def reader(self) -> SimpleNamespace:
        """Header-only stand-in for a ``GGUFReader``, enough for :func:`~cosmic_bake.bake_gguf.plan_edits`."""
        from gguf import GGMLQuantizationType

        tensors = [
            SimpleNamespace(name=n, shape=np.array(list(reversed(p.shape))), tensor_type=GGMLQuantizationType.F32)
            for n, p in self.planned.items()
        ]
        return SimpleNamespace(tensors=tensors)


def _gguf_vectors(src, r_hat: torch.Tensor, keys: set[str]) -> dict[str, torch.Tensor]:
    """As :func:`cosmic_bake.bake_gguf.edit_vectors`: ``unit(g * r_hat)`` with the stored gain ``g``."""
    vectors = {"r": r_hat}
    for key in keys - {"r"}:
        block, part = key.split(".")
        norm = f"blk.{block}.{'post_attention_norm' if part == 'attn_output' else 'post_ffw_norm'}.weight"
        vectors[key] = unit(src.gain(norm) * r_hat)
    return vectors


def _gguf_pairs(src, out, name: str, layout: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(original, baked) units of one GGUF tensor; embeddings in row chunks."""
    if layout == "cols":
        n = src.shape(name)[0]
        for a in range(0, n, GGUF_ROW_CHUNK):
            b = min(n, a + GGUF_ROW_CHUNK)
            yield src.rows(name, a, b), out.rows(name, a, b)
        return
    x_o, x_b = src.full(name), out.full(name)
    shape = x_o.shape
    if layout == "rows":  # [.., d, k]: one unit per expert
        x_o, x_b = x_o.reshape(-1, *shape[-2:]), x_b.reshape(-1, *shape[-2:])
        for a, b in zip(x_o, x_b):
            yield a.T, b.T
        return
    yield x_o.reshape(-1, shape[-1]), x_b.reshape(-1, shape[-1])


def check_gguf(
    source: str | Path,
    baked_gguf: str | Path,
    direction: Direction | str | Path,
    *,
    embeddings: str | None = None,
) -> WeightCheck:
    """Check a baked GGUF file against its unedited source: a GGUF file, or a transformers folder.

    A GGUF source is compared tensor by tensor (both dequantized with gguf-py). A folder is
    seen through the converter's own plan (names, stacked experts, Gemma's ``1 + w`` gains), so
    an ``--outtype`` bake from a transformers model is judged against the unrounded original.
    The edited tensors are those :func:`~cosmic_bake.bake_gguf.plan_edits` edits.
    """
    return _check_gguf(Path(source), _GgufTensors(Path(baked_gguf)), direction, embeddings)


def _check_gguf(
    source: Path, out: _GgufTensors, direction: Direction | str | Path, embeddings: str | None
) -> WeightCheck:
    from gguf import GGMLQuantizationType

    from cosmic_bake.bake_gguf import plan_edits
    from cosmic_bake.export.gguf_io import architecture, field_value

    baked = out.path
    d = _direction(direction, _gguf_settings(out.reader))
    if source.is_dir():
        src = _ConvertedFolder(source)
        reader, d_model, arch = src.reader(), src.hp.hidden, src.hp.arch
    else:
        src = _GgufTensors(source)
        reader, arch = src.reader, architecture(src.reader)
        d_model = int(field_value(src.reader, f"{arch}.embedding_length", 0))
    _check_size(d, d_model)
    emb = _embeddings(baked, embeddings)
    edits = plan_edits(reader, d_model, GGMLQuantizationType.F32, False, emb, remove=d.mode != "add")
    by_name = {e.name: e for e in edits}
    constant, target_name = None, None
    if d.mode != "ablate":
        at = 0 if d.mode == "scale" else d.layer
        target_name = "token_embd.weight" if at == 0 else f"blk.{at - 1}.ffn_down.bias"
        constant = d.hook().constant()
    divisor = math.sqrt(d_model) if arch in _GEMMA_ARCHS else 1.0
    r_hat = unit(d.direction.double())
    vectors = _gguf_vectors(src, r_hat, {e.vector for e in edits if e.kind != "copy" and e.vector})
    checked = [e for e in edits if e.kind != "copy" or e.name == target_name]
    if target_name is not None and target_name not in by_name:
        checked.append(SimpleNamespace(name=target_name, kind="bias", vector=None))
    results = []
    for e in checked:
        new = e.name not in by_name
        if e.name not in out.by_name and not new:
            raise CosmicBakeError(
                f"{baked} has no tensor {e.name}, which the bake writes", "pass the file baked from this model"
            )
        layout = "cols" if e.name in ("token_embd.weight", "position_embd.weight") else e.kind
        if layout == "copy":
            layout = "bias"
        if e.name in by_name:
            if src.shape(e.name) != out.shape(e.name):
                raise CosmicBakeError(
                    f"{e.name} has shape {list(out.shape(e.name))} in {baked} but {list(src.shape(e.name))} in the "
                    "source",
                    "pass the file baked from this model",
                )
            pairs = _gguf_pairs(src, out, e.name, layout)
            source_type = src.type_name(e.name)
        else:  # a new bias carrying the constant; missing from an unedited file
            zeros = torch.zeros(1, d_model, dtype=torch.float64)
            x_b = out.full(e.name).reshape(1, -1) if e.name in out.by_name else zeros
            pairs = iter([(zeros, x_b)])
            source_type = "(new)"
        projected = e.kind != "copy" and e.vector is not None and e.name in by_name
        carrier = e.name == target_name
        tgt = prescription(
            r_hat,
            vectors[e.vector] if projected else None,
            _coeff(d),
            constant if carrier else None,
            divisor if carrier and layout == "cols" else 1.0,
        )
        units = _judge_pairs(pairs, tgt, per_pair=layout == "rows")
        stored_type = out.type_name(e.name) if e.name in out.by_name else "(missing)"
        results.append(_result(e.name, gguf_class(e.name), source_type, stored_type, units))
    kind = "gguf (from a transformers folder)" if source.is_dir() else "gguf"
    rows, notes = class_rows(results), _notes(results, emb)
    return WeightCheck(kind, d.mode, d.alpha, str(source), str(baked), rows, results, notes=notes)


def _judge_pairs(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], target: Target, per_pair: bool
) -> list[UnitResult]:
    """Judge each pair as its own unit (experts), or all pairs as chunks of one unit."""
    if per_pair:
        return [judge(moments(a, b, target), target.u) for a, b in pairs]
    total: Moments | None = None
    for a, b in pairs:
        mo = moments(a, b, target)
        total = mo if total is None else total + mo
    if total is None:  # pragma: no cover - every planned tensor has rows
        raise RuntimeError("no rows to check")
    return [judge(total, target.u)]


# --------------------------------------------------------------------------------------------
# Entry point


def weight_check(
    original: str | Path,
    baked_path: str | Path,
    direction: Direction | str | Path,
    *,
    embeddings: str | None = None,
) -> WeightCheck | None:
    """The weight-space check for ``verify ORIGINAL BAKED --direction RUN``, whatever the formats.

    ``original`` is a model spec (folder, .gguf, builtin or Hub id). A baked ``.gguf`` is checked
    against the original GGUF, or against the transformers folder it was converted from; a
    baked folder against the safetensors folder the bake read (a GGUF original's dequantized
    cache, as ``bake`` uses). LoRA adapters (PEFT folders, llama.cpp adapters) leave the base
    weights unchanged, so there is nothing to check: None.
    """
    from cosmic_bake.model.loading import resolve, source_folder

    baked = Path(baked_path)
    if baked.is_dir() and (baked / "adapter_config.json").is_file():
        return None
    if baked.suffix.lower() == ".gguf":
        from cosmic_bake.export.gguf_io import field_value

        out = _GgufTensors(baked)
        if field_value(out.reader, "general.type") == "adapter":
            return None
        spec = resolve(str(original))
        source = spec.path if spec.kind == "gguf" else source_folder(str(original))[1]
        return _check_gguf(Path(source), out, direction, embeddings)
    if not (baked / "config.json").is_file():
        raise CosmicBakeError(f"{baked} is neither a .gguf file nor a model folder", "pass the baked output")
    return check_folder(source_folder(str(original))[1], baked, direction, embeddings=embeddings)
