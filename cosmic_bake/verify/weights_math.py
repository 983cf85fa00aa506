"""The weight-space check's pure math: tensors in, numbers out (see :mod:`.weights` for the method)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

CLASSES = ("embedding", "attn_output", "mlp_down", "experts", "bias")


K_ALLOWANCE = 4.0


RESIDUAL_BOUND = 0.5


EPS = 1e-9


CHUNK_ELEMENTS = 1 << 20  # float64 elements per block of the math (8 MiB per temporary)


GGUF_ROW_CHUNK = 8192  # embedding rows dequantized at a time (as bake.gguf_edit does)


STATUSES = ("pass", "unresolved", "fail")  # best to worst


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
    floor2: float = 0.0  # sum ((round(X_t) - X_t) u)^2: what nearest rounding to the stored float type leaves

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
            self.floor2 + other.floor2,
        )


FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)  # stored types whose rounding floor is computed


def stored_float(baked: torch.Tensor, stored: torch.dtype | None) -> torch.dtype | None:
    """The float type the baked values were stored in (None: quantized, or float64: no floor)."""
    kind = stored if stored is not None else baked.dtype
    return kind if kind in FLOAT_TYPES else None


def moments(original: torch.Tensor, baked: torch.Tensor, target: Target, stored: torch.dtype | None = None) -> Moments:
    """The sums for residual vectors ``original`` / ``baked`` (``[m, d]``, any float dtype).

    ``stored`` is the float type the baked values were stored in when ``baked`` was widened
    (a GGUF F16 / BF16 tensor read as float32); default ``baked.dtype``. For a float type the
    target itself is rounded to it, and what that rounding leaves along ``u`` is the floor no
    stored file can beat (see the module docstring of :mod:`.weights`). Works in float64 blocks
    of about :data:`CHUNK_ELEMENTS`, so transposed views of large writers need no float64 copy
    of the whole tensor.
    """
    if original.shape != baked.shape or original.ndim != 2:
        raise ValueError(f"shapes {tuple(original.shape)} and {tuple(baked.shape)} are not one [m, d] pair")
    d = original.shape[1]
    u = target.u
    total = Moments(d, col2=torch.zeros(d, dtype=torch.float64))
    floor_type = stored_float(baked, stored)
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
        floor2 = 0.0
        if floor_type is not None:
            x_t = x_o + torch.outer(shift, u)
            floor2 = float(((x_t.to(floor_type).double() - x_t) @ u).square().sum())
        edit2 = float(shift.square().sum())
        total = total + Moments(d, x_o.shape[0], e_u2, edit2, float(col2.sum()), size2, col2, floor2)
    return total


@dataclass(frozen=True)
class UnitResult:
    """One unit's figures: ``ratio`` is ``deviation / allowance``; see the module docstring."""

    deviation: float
    edit: float
    rounding: float
    floor: float  # |(round(X_t) - X_t) u|: the deviation of the best file of the stored float type
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
    floor = math.sqrt(max(mo.floor2, 0.0))
    allowance = k * rounding + floor + eps
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
    return UnitResult(dev, edit, rounding, floor, allowance, residual, ratio, status)


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
