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
from cosmic_bake.model.devices import input_device, to_device
from cosmic_bake.model.hooks import Intervention, intervene
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


@dataclass
class _Totals:
    """Running sums over batches, so the report never holds all logits at once."""

    positions: int = 0
    max_abs: float = 0.0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    agree: int = 0

    def add(self, hooked: torch.Tensor, baked: torch.Tensor) -> None:
        """``hooked`` and ``baked`` are ``[n, vocab]`` logits at real positions."""
        h, b = hooked.double(), baked.double()
        logp_h, logp_b = torch.log_softmax(h, dim=-1), torch.log_softmax(b, dim=-1)
        kl = (logp_h.exp() * (logp_h - logp_b)).sum(-1).clamp_min(0.0)
        self.positions += h.shape[0]
        self.max_abs = max(self.max_abs, float((h - b).abs().max()))
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.agree += int((h.argmax(-1) == b.argmax(-1)).sum())

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / max(1, self.positions)

    @property
    def top1(self) -> float:
        return self.agree / max(1, self.positions)

    def record(self) -> dict:
        return {
            "max_abs_logit_diff": self.max_abs,
            "mean_kl": self.mean_kl,
            "max_kl": self.kl_max,
            "top1_agreement": self.top1,
        }


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
    totals: _Totals,
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


@torch.no_grad()
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
    """
    if not prompts:
        raise CosmicBakeError("no prompts to verify on", "pass --prompts FILE with at least one prompt")
    vocab_a = original_model.get_output_embeddings().weight.shape[0]
    vocab_b = baked_model.get_output_embeddings().weight.shape[0]
    if vocab_a != vocab_b:
        raise CosmicBakeError(
            f"the original has {vocab_a} output tokens but the baked model {vocab_b}",
            "compare a baked model with the model it was baked from",
        )
    iv = _hook(direction)
    t0 = time.perf_counter()
    totals, unedited = _Totals(), _Totals()
    for start in range(0, len(prompts), batch_size):
        batch = fmt.encode(prompts[start : start + batch_size])
        real = batch["attention_mask"].bool()
        with intervene(arch, iv):
            hooked = _real_logits(original_model, batch, real)
        totals.add(hooked, _real_logits(baked_model, batch, real))
        unedited.add(hooked, _real_logits(original_model, batch, real))
    computed = _dtype_name(baked_model)
    dtype = coarser(computed, stored)
    max_kl_tol, top1_tol = tolerances_for(dtype)
    return _report(
        totals,
        len(prompts),
        t0,
        "max_kl",
        (max_kl_tol, top1_tol),
        unedited.mean_kl,
        dtype=dtype,
        stored_dtype=stored,
        unedited_reference={"kind": "original model without the hook", "dtype": computed},
    )


def _real_logits(model: torch.nn.Module, batch: dict, real: torch.Tensor) -> torch.Tensor:
    """Logits at the real (non-pad) positions, on the CPU: inputs go where the model's embedding computes."""
    logits = model(**to_device(batch, input_device(model)), use_cache=False).logits
    return logits[real.to(logits.device)].to("cpu")


def _ids(fmt, prompt: str) -> torch.Tensor:
    return fmt.encode([prompt])["input_ids"]


@torch.no_grad()
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
    """
    if not prompts:
        raise CosmicBakeError("no prompts to verify on", "pass --prompts FILE with at least one prompt")
    vocab = original_model.get_output_embeddings().weight.shape[0]
    if baked.n_vocab != vocab:
        raise CosmicBakeError(
            f"the original has {vocab} output tokens but the GGUF {baked.n_vocab}",
            "compare a baked model with the model it was baked from",
        )
    ivs = () if direction is None else (_hook(direction),)
    t0 = time.perf_counter()
    totals, floor, plain = _Totals(), _Totals(), _Totals()
    for prompt in prompts:
        ids = _ids(fmt, prompt)
        tokens = ids[0].tolist()
        every = torch.ones_like(ids, dtype=torch.bool)
        with intervene(arch, *ivs):
            hooked = _real_logits(original_model, {"input_ids": ids}, every)
        totals.add(hooked, torch.from_numpy(baked.logits(tokens)))
        if unedited is not None:
            reference = torch.from_numpy(unedited.logits(tokens))
            plain.add(hooked, reference)
            floor.add(_real_logits(original_model, {"input_ids": ids}, every) if ivs else hooked, reference)
    cls = weight_class(baked.path)
    mean_tol, top1_tol = GGUF_TOLERANCES[cls]
    unedited_kl = plain.mean_kl if unedited is not None and ivs else None
    return _report(
        totals,
        len(prompts),
        t0,
        "mean_kl",
        (mean_tol, top1_tol),
        unedited_kl,
        dtype="float32",
        runtime="llama.cpp",
        weight_type=cls,
        runtime_floor=floor.record() if unedited is not None else None,
        unedited_reference=unedited_reference,
    )
