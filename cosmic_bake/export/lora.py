"""A removal edit as LoRA adapters: a PEFT folder for transformers and a GGUF adapter for llama.cpp.

Removing ``u`` from a writer, ``W' = W - u (u^T W)``, is a rank-1 update ``W + B A`` with
``B = -u`` (``[d, 1]``) and ``A = u^T W`` (``[1, in]``); for the token embedding,
``E' = E - (E r) r^T`` is ``B = -r`` and ``A = (E r)^T`` (one number per token). LoRA scaling is
``alpha / rank = 1``. So the edit ships as a few megabytes beside an unchanged base, and llama.cpp
applies it to an existing, even quantized, GGUF (``--lora``). ``A`` is computed from the base's
own weights (the dequantized GGUF for a GGUF base), so base + adapter equals the baked weights up
to the base's rounding.

What a LoRA cannot carry is refused: constants (``add`` / ``affine`` modes), writer biases, and
fused expert tensors. Models with post-writer norms use ``u = unit(g * r)`` as baking does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math.projections import unit
from cosmic_bake.model.architecture import Architecture
from cosmic_bake.model.devices import cpu_param
from cosmic_bake.model.hooks import writer_directions

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GGUF_ADAPTER = "adapter.gguf"
_GGUF_WRITER = {"attn": "attn_output", "mlp": "ffn_down"}
# The first peft whose LoRA Embedding multiplies its delta rows by the base layer's ``embed_scale``
# (huggingface/peft#2825, commit 9b8cf2a, released in v0.18.0; absent from v0.17.1's lora/layer.py).
PEFT_SCALES_EMBEDDINGS = "0.18.0"


@dataclass
class LoraFactor:
    """``W + B A`` for one module: PEFT module name, GGUF base tensor name, the two factors (float64)."""

    module: str
    gguf_tensor: str
    a: torch.Tensor  # [1, in] for a Linear, [1, vocab] for the embedding
    b: torch.Tensor  # [d, 1]
    embedding: bool = False


def removal_factors(
    arch: Architecture, r: torch.Tensor, coeff: Callable[[int | None], float] = lambda _block: 1.0
) -> list[LoraFactor]:
    """The rank-1 factors of linear removal for the embedding and every attention / MLP writer.

    ``coeff(block)`` scales the removal of a writer of ``block`` (``None``: the embedding), as
    :meth:`~cosmic_bake.artifacts.Direction.coeff` gives it for a weighted removal.
    """
    r_hat = unit(r.detach().double())
    factors = []
    for b, (u_attn, u_mlp) in zip(arch.blocks, writer_directions(arch, r_hat)):
        for part, writers, u in (("attn", b.attn_writers, u_attn), ("mlp", b.mlp_writers, u_mlp)):
            if len(writers) != 1 or writers[0].param != "weight" or writers[0].weight.dim() != 2:
                raise CosmicBakeError(
                    f"block {b.index}'s {part} writes through fused expert tensors, which PEFT cannot adapt",
                    "bake the full model (--format hf or gguf) instead of --format lora",
                )
            w = writers[0]
            bias = cpu_param(w.module, w.bias) if w.bias else None
            if bias is not None and float(bias.double() @ u) != 0.0:
                raise CosmicBakeError(
                    f"{w.name} has a bias with a component along the direction; a LoRA cannot change biases",
                    "bake the full model (--format hf or gguf) instead of --format lora",
                )
            weight = cpu_param(w.module, w.param).double()  # on any device, or offloaded
            factors.append(
                LoraFactor(
                    arch.name_of(w.module),
                    f"blk.{b.index}.{_GGUF_WRITER[part]}.weight",
                    (u @ weight).unsqueeze(0),
                    -coeff(b.index) * u.unsqueeze(1),
                )
            )
    emb = cpu_param(arch.embed).double()
    factors.insert(
        0,
        LoraFactor(
            arch.name_of(arch.embed),
            "token_embd.weight",
            (emb @ r_hat).unsqueeze(0),
            -coeff(None) * r_hat.unsqueeze(1),
            True,
        ),
    )
    return factors


def _installed_peft() -> str:
    from importlib.metadata import version

    return version("peft")


def check_peft(base: torch.nn.Module) -> None:
    """Refuse a peft too old to apply our embedding adapter to ``base``'s scaled embedding.

    Gemma's embedding module (``Gemma3TextScaledWordEmbedding``; in transformers 5 Gemma 1 and 2
    too) multiplies its output by ``embed_scale`` = sqrt(d) inside ``forward``. peft before
    0.18.0 adds the LoRA rows after that call, unscaled, so base + adapter would remove only
    1/sqrt(d) of the direction from the embedding: a silently different model, not an error.
    """
    embed = base.get_input_embeddings()
    if getattr(embed, "embed_scale", None) is None:
        return
    from packaging.version import Version

    installed = _installed_peft()
    if Version(installed) < Version(PEFT_SCALES_EMBEDDINGS):
        raise CosmicBakeError(
            f"peft {installed} is too old for Gemma embedding adapters ({type(embed).__name__} scales its rows)",
            f"pip install 'peft>={PEFT_SCALES_EMBEDDINGS}'",
        )


def write_peft(factors: list[LoraFactor], out: Path, base_model: str, dtype: torch.dtype = torch.float32) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    tensors = {}
    for f in factors:
        key = f"base_model.model.{f.module}"
        if f.embedding:  # PEFT's embedding LoRA: delta rows = A^T[token] @ B^T
            tensors[f"{key}.lora_embedding_A"] = f.a.to(dtype).contiguous()
            tensors[f"{key}.lora_embedding_B"] = f.b.to(dtype).contiguous()
        else:
            tensors[f"{key}.lora_A.weight"] = f.a.to(dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = f.b.to(dtype).contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(f.module for f in factors),
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_gguf_adapter(factors: list[LoraFactor], path: Path, arch_name: str, metadata: dict) -> None:
    """A llama.cpp LoRA adapter (``general.type = adapter``) for a base of architecture ``arch_name``.

    llama.cpp names each pair after the base tensor (``blk.N.attn_output.weight.lora_a``) and wants
    ``lora_a`` ``[rank, in]`` and ``lora_b`` ``[out, rank]`` (numpy order); for ``token_embd`` the
    two are flipped (``lora_a`` ``[vocab, rank]``, ``lora_b`` ``[d, rank]``) because it looks rows
    of ``lora_a`` up by token.
    """
    import gguf

    from cosmic_bake.export.gguf_io import add_metadata

    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 1.0)
    add_metadata(writer, metadata)
    for f in factors:
        a = f.a.t() if f.embedding else f.a
        writer.add_tensor(f"{f.gguf_tensor}.lora_a", a.float().contiguous().numpy())
        writer.add_tensor(f"{f.gguf_tensor}.lora_b", f.b.float().contiguous().numpy())
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_lora_folder(
    lm,
    arch: Architecture,
    d,
    out: Path,
    *,
    src: dict,
    gguf: bool,
    force: bool,
    inputs=(),
    base_model: str | None = None,
    record_paths: bool = False,
    settings: dict | None = None,
) -> dict:
    """Write the folder ``api.export_lora`` describes (``lm``: the loaded base, ``d``: a checked ablate direction).

    ``adapter_config.json``'s ``base_model_name_or_path`` is the base's Hub id when known
    (``base_model``, a Hub source, a GGUF's keys), else its file name; the spec as typed only
    with ``record_paths`` (PEFT loads the base from it, and the folder is meant to be uploaded).
    ``settings`` (the bake command's, serialised) goes into the manifest.
    """
    from cosmic_bake.export.card import lora_card
    from cosmic_bake.export.lineage import lineage
    from cosmic_bake.outputs import atomic_dir, manifest

    with torch.no_grad():
        factors = removal_factors(arch, d.direction, d.coeff)
    folder = lm.source.path if lm.source.kind == "folder" else None
    lin = lineage(lm.source, base_model=base_model, folder=folder, model_id=d.model_id)
    base_name = lm.source.spec if record_paths else (lin.base_model or lin.label)
    written: dict[str, int] = {}
    warnings = []
    if gguf and arch.tied:
        # llama.cpp looks adapters up by tensor name, and a tied head *is* token_embd.weight: the
        # embedding adapter would be applied to the output head too (it aborts on the shapes).
        gguf = False
        warnings.append(
            "no llama.cpp adapter: the model ties its output head to the token embedding, which a llama.cpp "
            "LoRA cannot edit separately; bake a GGUF instead (--format gguf)"
        )
    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        write_peft(factors, tmp, base_name)
        if gguf:
            gguf_arch = gguf_architecture(lm.source, arch.model_type)
            write_gguf_adapter(
                factors,
                tmp / GGUF_ADAPTER,
                gguf_arch,
                {"cosmic_bake.direction_sha256": d.digest, "cosmic_bake.layer": d.layer, "cosmic_bake.mode": "ablate"},
            )
        (tmp / "README.md").write_text(lora_card(lin, d, len(factors), gguf), encoding="utf-8")
        written = {p.name: p.stat().st_size for p in tmp.iterdir()}
        extra = {"direction": d.record(), "modules": len(factors), "lineage": lin.record(), "settings": settings}
        manifest(tmp, stage="bake-lora", source=src, extra=extra, record_paths=record_paths)
    return {"out": str(out), "modules": len(factors), "bytes": written, "tied": arch.tied, "warnings": warnings}


def gguf_architecture(source, model_type: str) -> str:
    """llama.cpp's architecture name for the base: the GGUF's own, or the converter's mapping."""
    if source.kind == "gguf":
        from cosmic_bake.export.gguf_io import architecture, open_gguf

        return architecture(open_gguf(source.path))
    from cosmic_bake.export.gguf_hparams import SUPPORTED_MODEL_TYPES

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CosmicBakeError(f"no llama.cpp architecture known for '{model_type}'", "pass --no-gguf-adapter")
    return SUPPORTED_MODEL_TYPES[model_type]
