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
    kl_tolerance: float  # applies to the statistic named by `gate`
    top1_tolerance: float
    passed: bool
    seconds: float
    runtime: str = "transformers"
    weight_type: str = ""
    gate: str = "max_kl"  # which KL statistic the tolerance applies to
    runtime_floor: dict | None = None  # unedited GGUF in llama.cpp vs unedited transformers

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


def _hook(direction: Direction | torch.Tensor) -> Intervention:
    """The hook a model baked from ``direction`` equals (a bare tensor: removal)."""
    return direction.hook() if isinstance(direction, Direction) else Intervention.remove(direction)


def baked_settings(baked: str) -> tuple[str, float] | None:
    """(mode, alpha) a baked folder's manifest or a baked GGUF's metadata records, if any."""
    from pathlib import Path

    from cosmic_bake.outputs import read_json

    path = Path(baked)
    if path.suffix.lower() == ".gguf" and path.is_file():
        from cosmic_bake.export.gguf_io import field_value, open_gguf

        reader = open_gguf(path)
        mode = field_value(reader, "cosmic_bake.mode")
        return (str(mode), float(field_value(reader, "cosmic_bake.alpha", 0.0))) if mode else None
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
    iv = _hook(direction)
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
        kl_tolerance=max_kl_tol,
        top1_tolerance=top1_tol,
        passed=totals.kl_max <= max_kl_tol and agreement >= top1_tol,
        seconds=time.perf_counter() - t0,
    )


# GGUF in llama.cpp, by the least precise weight type in the file: (mean KL, min top-1 agreement).
# llama.cpp's CPU kernels round activations to 8 bits (or to f16) before quantized (or half)
# matrix products, so even an unedited file differs from transformers by the "runtime floor"
# that verify also measures; the gates sit above that floor and below what a wrong edit gives
# (removing the direction wrongly moves mean KL by ~1e-2 and more on these models). Top-1 gates
# are loose for quantized files: near-ties flip (and MoE routing flips whole experts).
GGUF_TOLERANCES: dict[str, tuple[float, float]] = {
    "F32": (1e-6, 0.999),
    "F16": (2e-3, 0.98),
    "BF16": (5e-3, 0.97),
    "8-bit": (1e-2, 0.90),
    "6-bit": (2e-2, 0.88),
    "5-bit": (4e-2, 0.85),
    "4-bit": (1.5e-1, 0.75),
    "lower": (3e-1, 0.65),
}


def gguf_class(type_name: str) -> str:
    """Tolerance class of a GGML tensor type name."""
    t = type_name.upper()
    if t in ("F32", "F64", "F16", "BF16"):
        return "F32" if t in ("F32", "F64") else t
    bits = {"Q8": "8-bit", "Q6": "6-bit", "Q5": "5-bit", "Q4": "4-bit", "IQ4": "4-bit", "MXFP4": "4-bit"}
    for prefix, cls in sorted(bits.items(), key=lambda kv: -len(kv[0])):
        if t.startswith(prefix):
            return cls
    return "lower"


_ORDER = list(GGUF_TOLERANCES)


def weight_class(path) -> str:
    """The least precise tolerance class among a GGUF's matrices (2-D and larger tensors)."""
    from cosmic_bake.export.gguf_io import open_gguf

    classes = {gguf_class(t.tensor_type.name) for t in open_gguf(path).tensors if len(t.shape) >= 2}
    return max(classes, key=_ORDER.index) if classes else "F32"


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
    source=None,
) -> VerifyReport:
    """Compare a baked GGUF run by llama.cpp with ``original_model`` + removal hook, prompt by prompt.

    ``baked`` (and ``source``, the unedited GGUF, when the original is one) are
    :class:`~cosmic_bake.model.llamacpp.LlamaCppModel` opened with ``all_logits=True``. With a
    source, the unedited runtime floor is measured on the same tokens and reported beside.
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
    totals, floor = _Totals(), _Totals()
    for prompt in prompts:
        ids = _ids(fmt, prompt)
        with intervene(arch, *ivs):
            hooked = original_model(input_ids=ids, use_cache=False).logits[0]
        totals.add(hooked, torch.from_numpy(baked.logits(ids[0].tolist())))
        if source is not None:
            plain = original_model(input_ids=ids, use_cache=False).logits[0]
            floor.add(plain, torch.from_numpy(source.logits(ids[0].tolist())))
    cls = weight_class(baked.path)
    mean_tol, top1_tol = GGUF_TOLERANCES[cls]
    agreement = totals.agree / max(1, totals.positions)
    mean_kl = totals.kl_sum / max(1, totals.positions)
    floor_rec = None
    if source is not None:
        floor_rec = {
            "max_abs_logit_diff": floor.max_abs,
            "mean_kl": floor.kl_sum / max(1, floor.positions),
            "max_kl": floor.kl_max,
            "top1_agreement": floor.agree / max(1, floor.positions),
        }
    return VerifyReport(
        n_prompts=len(prompts),
        n_positions=totals.positions,
        dtype="float32",
        max_abs_logit_diff=totals.max_abs,
        mean_kl=mean_kl,
        max_kl=totals.kl_max,
        top1_agreement=agreement,
        kl_tolerance=mean_tol,
        top1_tolerance=top1_tol,
        passed=mean_kl <= mean_tol and agreement >= top1_tol,
        seconds=time.perf_counter() - t0,
        runtime="llama.cpp",
        weight_type=cls,
        gate="mean_kl",
        runtime_floor=floor_rec,
    )
