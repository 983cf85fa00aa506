"""Check a baked model against the original with the runtime hook (spec section 7).

Both models see the same tokenized prompts; the original runs with linear removal hooked in at
every layer, the baked one plain. At every real (non-pad) position we compare the next-token
distributions: max |delta logit|, mean and max KL(hook || baked) in float64, and top-1
agreement. In float32 they must agree to float error; looser tolerances apply to half precision,
where the baked weights are rounded to the storage type after the edit.

Absolute tolerances alone cannot tell a rounded edit from no edit when the rounding of a coarse
type is as large as the edit itself, so every report also measures the *unedited* model in the
same runtime and type against the same hook: the baked file must be much closer to the hook than
that (:data:`RATIO_MAX`). A file whose storage undoes much of the edit fails, as it should.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from cosmic_bake.artifacts import Direction
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.architecture import Architecture
from cosmic_bake.model.hooks import Intervention
from cosmic_bake.verify.passes import OriginalPass, Totals, compare_llamacpp, compare_transformers, record_original
from cosmic_bake.verify.tolerances import GGUF_TOLERANCES, coarser, tolerances_for, weight_class

# A baked file must be at least this much closer to the hook (in mean KL) than the unedited file of
# the same runtime and type. For small differences KL grows with the square of the logit
# difference, so 0.25 means: the baked file's logits sit less than half as far from the hook as
# the unedited file's, i.e. on the edited side of the midpoint between the two models. A file
# whose rounding undoes half the edit or more fails; correctly rounded 8-bit files measure ~0.03.
RATIO_MAX = 0.25
# An edit whose hook moves the unedited model by less than this (mean KL) has no effect to carry.
NO_EFFECT_KL = 1e-12


@dataclass
class VerifyReport:
    """How closely the baked model matches original + hook; JSON-serialisable via :meth:`to_dict`."""

    n_prompts: int
    n_positions: int
    dtype: str
    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    kl_tolerance: float  # applies to the statistic named by `gate`
    top1_tolerance: float
    passed: bool
    seconds: float
    runtime: str = "transformers"
    weight_type: str = ""
    gate: str = "max_kl"  # which KL statistic the tolerance applies to
    runtime_floor: dict | None = None  # unedited GGUF in llama.cpp vs unedited transformers
    stored_dtype: str = ""  # transformers: the coarsest dtype the baked weights are stored in
    unedited_mean_kl: float | None = None  # mean KL(hook || unedited model, same runtime and type)
    ratio: float | None = None  # mean_kl / unedited_mean_kl
    ratio_max: float = RATIO_MAX
    unedited_reference: dict | None = None  # which unedited file was measured (GGUF)
    reasons: list[str] = field(default_factory=list)  # why it failed, one line each
    weights: dict | None = None  # the prompt-free weight-space check (verify.weights_report.WeightCheck.to_dict)

    def to_dict(self) -> dict:
        return asdict(self)


def judge(
    kl: float, kl_tol: float, top1: float, top1_tol: float, mean_kl: float, unedited_mean_kl: float | None
) -> tuple[float | None, list[str]]:
    """``(ratio, reasons)``: the verdict of both gates; no reasons means PASS.

    ``kl`` is the statistic the absolute tolerance applies to (max KL in transformers, mean KL for
    GGUF). ``unedited_mean_kl`` None skips the relative gate (no unedited reference measured), and
    so does an edit without measurable effect (``unedited_mean_kl <= NO_EFFECT_KL``, e.g. ``add``
    at alpha 0): there the unedited model *is* the hook, and the absolute gates decide alone.
    """
    reasons = []
    if not kl <= kl_tol:
        reasons.append(f"KL {kl:.3e} is above the tolerance {kl_tol:.2g} for this type")
    if not top1 >= top1_tol:
        reasons.append(f"top-1 agreement {top1:.4f} is below {top1_tol}")
    ratio = None
    if unedited_mean_kl is not None and unedited_mean_kl > NO_EFFECT_KL:
        ratio = mean_kl / unedited_mean_kl
        if not ratio <= RATIO_MAX:
            reasons.append(
                f"the baked model is no closer to the hook than {RATIO_MAX:g} x the unedited model's KL "
                f"(mean KL {mean_kl:.3e} vs unedited {unedited_mean_kl:.3e}, ratio {ratio:.3f}): "
                "the stored weights do not carry the edit"
            )
    return ratio, reasons


def _report(
    totals: Totals,
    n_prompts: int,
    t0: float,
    gate: str,
    tolerances: tuple[float, float],
    unedited_kl: float | None,
    **extra,
) -> VerifyReport:
    """Judge ``totals`` against ``tolerances`` (KL on the ``gate`` statistic, top-1) and the unedited KL."""
    kl_tol, top1_tol = tolerances
    kl = totals.kl_max if gate == "max_kl" else totals.mean_kl
    ratio, reasons = judge(kl, kl_tol, totals.top1, top1_tol, totals.mean_kl, unedited_kl)
    return VerifyReport(
        n_prompts=n_prompts,
        n_positions=totals.positions,
        max_abs_logit_diff=totals.max_abs,
        mean_kl=totals.mean_kl,
        max_kl=totals.kl_max,
        top1_agreement=totals.top1,
        kl_tolerance=kl_tol,
        top1_tolerance=top1_tol,
        passed=not reasons,
        seconds=time.perf_counter() - t0,
        gate=gate,
        unedited_mean_kl=unedited_kl,
        ratio=ratio,
        reasons=reasons,
        **extra,
    )


def _hook(direction: Direction | torch.Tensor) -> Intervention:
    """The hook a model baked from ``direction`` equals (a bare tensor: removal)."""
    return direction.hook() if isinstance(direction, Direction) else Intervention.remove(direction)


def add_weight_check(report: VerifyReport, check) -> VerifyReport:
    """Fold a :class:`~cosmic_bake.verify.weights_report.WeightCheck` (or None: nothing to check) into ``report``."""
    if check is None:
        return report
    report.weights = check.to_dict()
    failed = [r for r in check.rows if not r.passed]
    if failed:
        names = ", ".join(f"{r.cls} ({r.stored_type}, max residual {r.max_residual:.3g})" for r in failed)
        report.reasons.append(f"weight-space check: the stored weights do not carry the edit in {names}")
        report.passed = False
    return report


def _dtype_name(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def verify(
    original_model: torch.nn.Module,
    arch: Architecture,
    baked_model: torch.nn.Module,
    direction: Direction | torch.Tensor,
    prompts: list[str],
    fmt,
    batch_size: int = 8,
    *,
    stored: str = "",
) -> VerifyReport:
    """Compare ``baked_model`` with ``original_model`` + its hook on ``prompts``.

    ``arch`` is ``probe(original_model)``; ``fmt`` a :class:`~cosmic_bake.model.chat.ChatFormat`
    of the original's tokenizer (both models get the same token ids). The tolerance follows the
    coarser of the dtype the baked model computes in and ``stored``, the dtype its weights are
    stored in (a bf16 checkpoint verified in float32 still carries bf16 rounding). The original
    without the hook is measured too: the unedited reference of the relative gate.

    Both models are given here, so both are in memory; ``api.verify`` holds one at a time by
    calling the two halves, :func:`record` and :func:`compare`, with the original freed between.
    """
    rec = record(original_model, arch, direction, prompts, fmt, batch_size)
    try:
        return compare(rec, baked_model, stored=stored)
    finally:
        rec.close()


def record(original_model, arch: Architecture, direction, prompts: list[str], fmt, batch_size: int = 8) -> OriginalPass:
    """The original's half of :func:`verify`: its hooked logits spooled, the unedited KL measured."""
    if not prompts:
        raise CosmicBakeError("no prompts to verify on", "pass --prompts FILE with at least one prompt")
    return record_original(original_model, arch, _hook(direction), prompts, fmt, batch_size)


def compare(
    rec: OriginalPass, baked_model: torch.nn.Module, *, stored: str = "", rows: int | None = None
) -> VerifyReport:
    """The baked model's half of :func:`verify`, against what :func:`record` left.

    ``rows``: at most this many prompts per forward pass (None: the recorded batches whole).
    """
    vocab_b = baked_model.get_output_embeddings().weight.shape[0]
    if rec.vocab != vocab_b:
        raise CosmicBakeError(
            f"the original has {rec.vocab} output tokens but the baked model {vocab_b}",
            "compare a baked model with the model it was baked from",
        )
    totals, seconds = compare_transformers(rec, baked_model, rows)
    computed = _dtype_name(baked_model)
    dtype = coarser(computed, stored)
    max_kl_tol, top1_tol = tolerances_for(dtype)
    return _report(
        totals,
        rec.n_prompts,
        rec.seconds + seconds,
        "max_kl",
        (max_kl_tol, top1_tol),
        rec.unedited.mean_kl if rec.unedited is not None else None,
        dtype=dtype,
        stored_dtype=stored,
        unedited_reference={"kind": "original model without the hook", "dtype": rec.dtype},
    )


def verify_gguf(
    original_model: torch.nn.Module,
    arch: Architecture,
    baked,
    direction: Direction | torch.Tensor | None,
    prompts: list[str],
    fmt,
    *,
    unedited=None,
    unedited_reference: dict | None = None,
) -> VerifyReport:
    """Compare a baked GGUF run by llama.cpp with ``original_model`` + its hook, prompt by prompt.

    ``baked`` (and ``unedited``, the unedited model as a GGUF of the same type: the source GGUF,
    or the unedited float model quantized like the output) are
    :class:`~cosmic_bake.model.llamacpp.LlamaCppModel` opened with ``all_logits=True``. With
    ``unedited``, the same tokens also give the relative gate (``KL(hook || unedited)``) and the
    runtime floor (``KL(original || unedited)``: what llama.cpp's own arithmetic costs).
    ``direction`` None compares with ``original_model`` as it is (e.g. a model baked in transformers).
    ``api.verify`` calls the halves (:func:`record_for_gguf`, :func:`compare_gguf`) with one
    model open at a time.
    """
    rec = record_for_gguf(original_model, arch, direction, prompts, fmt, plain=unedited is not None)
    try:
        return compare_gguf(rec, baked, direction is not None, unedited=unedited, unedited_reference=unedited_reference)
    finally:
        rec.close()


def record_for_gguf(original_model, arch, direction, prompts: list[str], fmt, *, plain: bool) -> OriginalPass:
    """The original's half of :func:`verify_gguf`: hooked (and, with ``plain``, unhooked) logits, per prompt."""
    if not prompts:
        raise CosmicBakeError("no prompts to verify on", "pass --prompts FILE with at least one prompt")
    hook = None if direction is None else _hook(direction)
    return record_original(original_model, arch, hook, prompts, fmt, 1, measure_unedited=False, keep_plain=plain)


def compare_gguf(
    rec: OriginalPass,
    baked,
    hooked: bool,
    *,
    unedited=None,
    unedited_reference: dict | None = None,
) -> VerifyReport:
    """The llama.cpp half of :func:`verify_gguf`; ``baked`` and ``unedited`` may be opened one after the other.

    Each of them is a :class:`~cosmic_bake.model.llamacpp.LlamaCppModel`, or a callable that opens
    one (it is closed here once compared), so that only one llama.cpp model is open at a time.
    ``hooked``: whether the recorded logits carry a hook (else there is no relative gate).
    """
    t0 = time.perf_counter()
    model, opened = _open(baked)
    try:
        if model.n_vocab != rec.vocab:
            raise CosmicBakeError(
                f"the original has {rec.vocab} output tokens but the GGUF {model.n_vocab}",
                "compare a baked model with the model it was baked from",
            )
        (totals,) = compare_llamacpp(rec, model, rec.hooked)
        cls = weight_class(model.path)
    finally:
        if opened:
            model.close()
    floor = plain = None
    if unedited is not None:
        reference, opened = _open(unedited)
        try:
            plain, floor = compare_llamacpp(rec, reference, rec.hooked, rec.plain or rec.hooked)
        finally:
            if opened:
                reference.close()
    mean_tol, top1_tol = GGUF_TOLERANCES[cls]
    unedited_kl = plain.mean_kl if plain is not None and hooked else None
    return _report(
        totals,
        rec.n_prompts,
        rec.seconds + time.perf_counter() - t0,
        "mean_kl",
        (mean_tol, top1_tol),
        unedited_kl,
        dtype="float32",
        runtime="llama.cpp",
        weight_type=cls,
        runtime_floor=floor.record() if floor is not None else None,
        unedited_reference=unedited_reference,
    )


def _open(model) -> tuple[object, bool]:
    """``(model, opened here)``: call a loader, or take an open model as it is."""
    return (model(), True) if callable(model) else (model, False)
