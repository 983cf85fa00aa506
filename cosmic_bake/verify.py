"""Check a baked model against the original with the runtime hook (spec section 7).

Both models see the same tokenized prompts; the original runs with linear removal hooked in at
every layer, the baked one plain. At every real (non-pad) position we compare the next-token
distributions: max |delta logit|, mean and max KL(hook || baked) in float64, and top-1
agreement. In float32 they must agree to float error; looser tolerances apply to half precision,
where the baked weights are rounded to the storage type after the edit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from cosmic_bake.artifacts import Direction
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.architecture import Architecture
from cosmic_bake.model.hooks import Intervention, intervene

# dtype -> (max KL, min top-1 agreement). float32: float error only. Half precision: the baked
# weights are rounded after the edit, so logits move by about the storage precision.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1.0),
    "float32": (1e-6, 1.0),
    "bfloat16": (2e-2, 0.95),
    "float16": (5e-3, 0.98),
}


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
    max_kl_tolerance: float
    top1_tolerance: float
    passed: bool
    seconds: float

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


def _dtype_name(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def tolerances_for(dtype: str) -> tuple[float, float]:
    """(max KL, min top-1 agreement) for a model stored in ``dtype``."""
    return TOLERANCES.get(dtype, TOLERANCES["bfloat16"])


@torch.no_grad()
def verify(
    original_model: torch.nn.Module,
    arch: Architecture,
    baked_model: torch.nn.Module,
    direction: Direction | torch.Tensor,
    prompts: list[str],
    fmt,
    batch_size: int = 8,
) -> VerifyReport:
    """Compare ``baked_model`` with ``original_model`` + removal hook on ``prompts``.

    ``arch`` is ``probe(original_model)``; ``fmt`` a :class:`~cosmic_bake.model.chat.ChatFormat`
    of the original's tokenizer (both models get the same token ids).
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
    r = direction.direction if isinstance(direction, Direction) else direction
    iv = Intervention.remove(r)
    t0 = time.perf_counter()
    totals = _Totals()
    for start in range(0, len(prompts), batch_size):
        batch = fmt.encode(prompts[start : start + batch_size])
        with intervene(arch, iv):
            hooked = original_model(**batch, use_cache=False).logits
        baked = baked_model(**batch, use_cache=False).logits
        real = batch["attention_mask"].bool()
        totals.add(hooked[real], baked[real])
    dtype = _dtype_name(baked_model)
    max_kl_tol, top1_tol = tolerances_for(dtype)
    agreement = totals.agree / max(1, totals.positions)
    return VerifyReport(
        n_prompts=len(prompts),
        n_positions=totals.positions,
        dtype=dtype,
        max_abs_logit_diff=totals.max_abs,
        mean_kl=totals.kl_sum / max(1, totals.positions),
        max_kl=totals.kl_max,
        top1_agreement=agreement,
        max_kl_tolerance=max_kl_tol,
        top1_tolerance=top1_tol,
        passed=totals.kl_max <= max_kl_tol and agreement >= top1_tol,
        seconds=time.perf_counter() - t0,
    )
