"""Write a transformers (HF) checkpoint folder as a float GGUF file that stock llama.cpp runs.

Why our own converter rather than llama.cpp's ``convert_hf_to_gguf.py``: that script is in no PyPI
package (gguf-py ships the format, not the conversion), and gguf-py holds the tables that matter:
the architecture names (:data:`gguf.MODEL_ARCH`), which tensors an architecture has (:data:`gguf.MODEL_TENSORS`), the
HF -> GGUF tensor names (:func:`gguf.get_tensor_name_map`), the metadata keys (``GGUFWriter.add_*``)
and the tokenizer side files (:class:`gguf.SpecialVocab`). This module adds only what llama.cpp
expects beyond a rename:

* ``llama`` arch (Llama, Mistral, Mixtral): llama.cpp rotates adjacent pairs (GPT-J style RoPE)
  while HF checkpoints rotate the two halves of each head, so the rows of ``q_proj`` / ``k_proj``
  (and their biases) are permuted within each head. Other archs here use NeoX RoPE: no permutation.
* Gemma 2 / 3: HF's RMSNorm multiplies by ``1 + weight``; llama.cpp multiplies by ``weight``, so
  every norm gain is written as ``1 + weight`` (in float32, as HF computes it).
* MoE: HF stores one tensor per expert; llama.cpp wants one ``[n_expert, out, in]`` tensor per
  projection (``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``).
* Tokenizer: byte-level BPE from ``tokenizer.json`` (llama.cpp's ``gpt2`` model). llama.cpp does
  not read the pre-tokenizer from the file; it picks a built-in regex by name
  (``tokenizer.ggml.pre``), so the name is derived by comparing ``tokenizer.json``'s pre-tokenizer
  with the regexes llama.cpp's ``llama-vocab.cpp`` uses for each name.

Types: 2-D+ weights in the requested float type, 1-D tensors (norms, biases) and MoE routers in
float32, as llama.cpp's own converter does (they are tiny, and the router picks the experts, so
its precision decides which experts run). ``q8_0`` is written directly as well: llama.cpp's rule
for that file type is one type for every weight it quantizes (no per-tensor mixture), so each
such tensor is quantized here with llama.cpp's own row quantizer (:func:`~.ggml_quant.quantize_rows`);
the file equals what ``llama_model_quantize`` makes from a float file, with no float file on disk
(other types: :mod:`cosmic_bake.export.gguf_export`). Tensors are streamed one at a time (experts:
one stacked projection at a time) into a temporary file beside the output, renamed into place at
the end. They are read from the folder's safetensors files, or, given ``tensors``, from the sources
a bake plans (edited when the writer reaches them), so a bake needs no baked folder on disk.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export import ggml_quant
from cosmic_bake.export.gguf_hparams import (
    Hparams,
    add_model_keys,
    llama3_rope_factors,
    read_hparams,
    rope_dims,
    rope_params,
)
from cosmic_bake.export.gguf_io import add_metadata
from cosmic_bake.export.gguf_sources import ggml_shape, quantized, source_listing, tensor_reader
from cosmic_bake.export.gguf_vocab import read_vocab
from cosmic_bake.export.safetensors_read import DTYPES, Listing, TensorInfo, list_weights
from cosmic_bake.export.safetensors_write import TensorSource

OUTTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,  # quantized here, row chunk by row chunk
}
_TORCH_TYPES = {
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
}
# numpy has no bfloat16: its bits travel as int16 (gguf-py only needs the byte count and raw type)
_NUMPY_VIEWS = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.int16}

_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
_EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<index>\d+)\.(?P<tail>.+)$")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved; llama.cpp recomputes them
# llama.cpp archs that load output.weight as required, with no fallback to token_embd: a tied
# model gets a copy of its embedding there (found by loading tied tiny models of every arch).
_OUTPUT_REQUIRED = {"qwen2moe"}
# Bias tensors each llama.cpp arch loads (llama: attention_bias / mlp_bias; Qwen: q/k/v). Any other
# bias would make llama.cpp fail at load ("wrong number of tensors"), so it is refused up front.
_BIASES: dict[str, set[str]] = {
    "llama": {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"},
    "qwen2": {"attn_q", "attn_k", "attn_v"},
    "qwen2moe": {"attn_q", "attn_k", "attn_v"},
}
_ROUTERS = ("ffn_gate_inp.", "ffn_gate_inp_shexp.")  # kept in float32 (see module docstring)


@dataclass
class ConvertReport:
    """What :func:`convert_folder` wrote, for the CLI summary and the export manifest."""

    path: Path
    model_type: str  # HF config model_type
    arch: str  # llama.cpp architecture written to general.architecture
    n_tensors: int
    outtype: str
    file_bytes: int
    seconds: float
    tokenizer_pre: str
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Planned:
    """One GGUF tensor: its name, torch-order shape, type, and how to make it from the source."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    sources: tuple[TensorInfo, ...]  # one tensor, or the experts stacked along a new first axis
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    make: Callable[[], torch.Tensor] | None = None  # a tensor computed from the config (no sources)

    @property
    def nbytes(self) -> int:
        if self.qtype not in _TORCH_TYPES:  # a block type: whole rows of the last dimension
            return math.prod(self.shape[:-1]) * ggml_quant.row_bytes(self.qtype, self.shape[-1])
        return math.prod(self.shape) * _TORCH_TYPES[self.qtype].itemsize


# --------------------------------------------------------------------------------------------
# Entry point


def convert_folder(
    folder: Path,
    out_file: Path,
    outtype: str = "f32",
    *,
    metadata: Mapping[str, str | int | float] | None = None,
    name: str | None = None,
    tensors: Mapping[str, TensorSource] | None = None,
) -> ConvertReport:
    """Convert the HF model ``folder`` to the GGUF file ``out_file`` (a float ``outtype``, or ``q8_0``).

    ``tensors`` (name -> :data:`~cosmic_bake.export.safetensors_write.TensorSource`) replaces the
    folder's safetensors files as the source of the weights; ``folder`` then gives only the
    config and tokenizer files (a bake streams its edited tensors in this way).

    ``metadata`` entries are added verbatim as extra GGUF keys (provenance such as the baked
    direction's hash), so a GGUF can be traced back to the run that made it. ``name`` is its
    ``general.name`` (default: the folder's name; a bake passes the source's name and the edit,
    since the folder is a temporary one). ``out_file`` is
    replaced atomically: written to a temporary file in its directory and renamed, and the
    temporary file is removed on any failure, so a crash never leaves a half-written model that
    llama.cpp would load. Refusing to overwrite an existing file is the caller's job.
    """
    start = time.perf_counter()
    folder, out_file = Path(folder), Path(out_file)
    if outtype not in OUTTYPES:
        raise CosmicBakeError(f"unknown GGUF outtype {outtype!r}", f"use one of {', '.join(OUTTYPES)}")
    if not out_file.parent.is_dir():
        raise CosmicBakeError(f"the output directory {out_file.parent} does not exist", "create it first")
    warnings: list[str] = []
    hp = read_hparams(folder, warnings)
    listing = list_weights(folder) if tensors is None else source_listing(folder, tensors)
    planned = plan_tensors(hp, listing, OUTTYPES[outtype])
    vocab = read_vocab(folder, n_rows=_embedding_rows(planned), warnings=warnings, name=name)

    writer = gguf.GGUFWriter(path=None, arch=hp.arch)
    add_model_keys(writer, hp, vocab.name, outtype, _embedding_rows(planned))
    vocab.add_to(writer)
    add_metadata(writer, metadata or {})
    quantized_file = OUTTYPES[outtype] not in _TORCH_TYPES
    for p in planned:
        view = _NUMPY_VIEWS[_TORCH_TYPES[p.qtype]] if p.qtype in _TORCH_TYPES else torch.float32  # shape as given
        raw = torch.empty((), dtype=view).numpy().dtype
        # llama.cpp's quantizer writes a [1, d] tensor as 1-D (ggml_n_dims); a q8_0 file does the same
        shape = ggml_shape(p.shape) if quantized_file else p.shape
        writer.add_tensor_info(p.name, shape, raw, p.nbytes, raw_dtype=p.qtype)

    tmp = out_file.with_name(f".{out_file.name}.{uuid.uuid4().hex[:12]}.tmp")  # same directory: rename is atomic
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with contextlib.ExitStack() as files:
            handles: dict[Path, Any] = {}
            for p in planned:
                writer.write_tensor_data(_produce(p, listing.folder, handles, files, tensors))
        assert writer.fout is not None
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ConvertReport(
        path=out_file,
        model_type=hp.model_type,
        arch=hp.arch,
        n_tensors=len(planned),
        outtype=outtype,
        file_bytes=out_file.stat().st_size,
        seconds=time.perf_counter() - start,
        tokenizer_pre=vocab.pre,
        warnings=warnings,
    )


# --------------------------------------------------------------------------------------------
# Config


# --------------------------------------------------------------------------------------------
# Tensors


def plan_tensors(hp: Hparams, listing: Listing, outtype: gguf.GGMLQuantizationType) -> list[_Planned]:
    """Name, shape, type and recipe of every output tensor, from the safetensors headers alone."""
    tensors = listing.tensors
    arch_enum = _ARCH_BY_NAME[hp.arch]
    names = gguf.get_tensor_name_map(arch_enum, hp.n_layers)
    has_output = gguf.MODEL_TENSOR.OUTPUT in gguf.MODEL_TENSORS[arch_enum]
    suffixes = (".weight", ".bias")

    # Experts: "<...>.experts.<i>.<proj>.weight" grouped as "<...>.experts.<proj>.weight", which is
    # the merged name gguf-py's table maps to the stacked ffn_*_exps tensor.
    groups: dict[str, dict[int, TensorInfo]] = {}
    for name, info in tensors.items():
        if m := _EXPERT.match(name):
            groups.setdefault(f"{m['head']}.{m['tail']}", {})[int(m["index"])] = info

    planned: list[_Planned] = []
    unmapped: list[str] = []
    seen_groups: set[str] = set()
    for name, info in tensors.items():
        if name.endswith(_SKIPPED_SUFFIXES):
            continue
        if m := _EXPERT.match(name):
            key = f"{m['head']}.{m['tail']}"
            if key in seen_groups:
                continue
            seen_groups.add(key)
            members = groups[key]
            if sorted(members) != list(range(hp.n_experts)):
                raise CosmicBakeError(
                    f"{key}: found experts {sorted(members)[:8]} but the config has {hp.n_experts}",
                    "re-download the model (incomplete checkpoint)",
                )
            sources = tuple(members[i] for i in range(hp.n_experts))
            if len({s.shape for s in sources}) != 1:
                raise CosmicBakeError(f"{key}: experts differ in shape", "re-download the model")
            gname = names.get_name(key, try_suffixes=suffixes)
            if gname is None:
                unmapped.append(name)
                continue
            shape = (hp.n_experts, *sources[0].shape)
            planned.append(_Planned(gname, shape, _qtype(gname, shape, outtype), sources))
            continue
        if name == "lm_head.weight":
            if not has_output:
                if hp.tied or _same_as_embedding(listing, info):
                    continue
                raise CosmicBakeError(
                    f"llama.cpp's {hp.arch} always ties the output layer to the embeddings, but this "
                    "model has a separate lm_head.weight",
                    "bake with --embeddings skip, or export with --format hf",
                )
            gname = "output.weight"
        else:
            gname = names.get_name(name, try_suffixes=suffixes)
        if gname is None:
            unmapped.append(name)
            continue
        if gname.endswith(".bias") and gname.split(".")[-2] not in _BIASES.get(hp.arch, set()):
            raise CosmicBakeError(
                f"llama.cpp's {hp.arch} has no {gname.split('.')[-2]} bias, but this model has {name}",
                "export with --format hf instead",
            )
        planned.append(_Planned(gname, info.shape, _qtype(gname, info.shape, outtype), (info,), _transform(hp, gname)))
    if unmapped:
        raise CosmicBakeError(
            f"GGUF export: no llama.cpp {hp.arch} tensor for {', '.join(unmapped[:3])}"
            f"{f' (+{len(unmapped) - 3} more)' if len(unmapped) > 3 else ''}",
            "export with --format hf instead",
        )
    produced = {p.name for p in planned}
    if "token_embd.weight" not in produced:
        raise CosmicBakeError("GGUF export: the checkpoint has no token embedding", "re-download the model")
    if "output.weight" not in produced and not hp.tied and has_output:
        raise CosmicBakeError(
            "config.json says tie_word_embeddings false but there is no lm_head.weight", "re-download the model"
        )
    rope = rope_params(hp.config)
    if rope["rope_type"] == "llama3":
        factors = llama3_rope_factors(rope, rope_dims(hp))
        planned.append(
            _Planned("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32, (), make=lambda: factors)
        )
    if "output.weight" not in produced and hp.arch in _OUTPUT_REQUIRED:
        embed = next(p for p in planned if p.name == "token_embd.weight")
        planned.append(_Planned("output.weight", embed.shape, embed.qtype, embed.sources))
    planned.sort(key=_tensor_order)
    return planned


def _tensor_order(p: _Planned) -> tuple[int, str]:
    """Global tensors first, then block by block (llama.cpp does not care; readers of the file do)."""
    m = _BLOCK.match(p.name)
    return (int(m[1]) + 1 if m else 0, p.name)


def _qtype(gname: str, shape: tuple[int, ...], outtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Float32 for 1-D tensors and routers; else ``outtype``, where llama.cpp would quantize it.

    llama.cpp quantizes a weight only when ggml counts 2+ dimensions (its ``ggml_n_dims`` ignores
    size-1 outer dimensions: a ``[1, d]`` gate is 1-D to it); such a tensor stays float32 here.
    """
    if len(shape) <= 1 or any(part in gname for part in _ROUTERS):
        return gguf.GGMLQuantizationType.F32
    if outtype not in _TORCH_TYPES:
        if len(ggml_shape(shape)) < 2:
            return gguf.GGMLQuantizationType.F32
        reason = ggml_quant.writable(outtype, shape[-1])
        if reason is not None:
            raise CosmicBakeError(
                f"cannot write {gname} {list(shape)} as {outtype.name}: {reason}", "use --outtype f16"
            )
    return outtype


def _same_as_embedding(listing: Listing, lm_head: TensorInfo) -> bool:
    """Whether a stored lm_head is a byte-identical copy of the embedding (then tying loses nothing)."""
    embed = next((t for n, t in listing.tensors.items() if n.endswith("embed_tokens.weight")), None)
    if embed is None or embed.shape != lm_head.shape or embed.dtype != lm_head.dtype:
        return False
    sources = getattr(listing, "sources", None)
    with contextlib.ExitStack() as files:
        read = tensor_reader(listing.folder, {}, files, sources)
        return torch.equal(read(lm_head), read(embed))


def _transform(hp: Hparams, gname: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The per-tensor edit llama.cpp's layout needs (see the module docstring), or None."""
    if hp.arch == "llama":
        if re.search(r"\.attn_q\.(weight|bias)$", gname):
            return lambda t: _unrotate_halves(t, hp.n_heads)
        if re.search(r"\.attn_k\.(weight|bias)$", gname):
            return lambda t: _unrotate_halves(t, hp.n_kv_heads)
    if hp.arch in ("gemma2", "gemma3") and gname.endswith("norm.weight"):
        return lambda t: t.float() + 1.0
    return None


def _unrotate_halves(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's [first half | second half] RoPE layout to llama.cpp's pairs.

    Row ``i`` of the first half and row ``i`` of the second half are rotated together by HF; llama.cpp
    rotates rows ``2i`` and ``2i+1``, so they are interleaved. Works for weights and biases.
    """
    rows = t.shape[0]
    return t.reshape(n_heads, 2, rows // n_heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _embedding_rows(planned: list[_Planned]) -> int:
    return next(p.shape[0] for p in planned if p.name == "token_embd.weight")


def _produce(
    p: _Planned, folder: Path, handles: dict[Path, Any], files: contextlib.ExitStack, sources=None
) -> np.ndarray:
    """Read (and stack, and edit) one output tensor and convert it to its GGUF type as a numpy array."""
    read = tensor_reader(folder, handles, files, sources)

    if p.make is not None:
        tensor = p.make()
    elif len(p.sources) == 1:
        tensor = read(p.sources[0])
    else:
        dtype = _TORCH_TYPES.get(p.qtype) or DTYPES[p.sources[0].dtype]  # q8_0: stacked as stored
        tensor = torch.empty(p.shape, dtype=dtype)
        for i, info in enumerate(p.sources):
            tensor[i] = read(info).to(dtype)
    if p.transform is not None:
        tensor = p.transform(tensor)
    if p.qtype not in _TORCH_TYPES:
        if tuple(tensor.shape) != p.shape:
            raise AssertionError(f"{p.name}: produced shape {tuple(tensor.shape)}, planned {p.shape}")
        return quantized(tensor, p.qtype)
    tensor = tensor.to(_TORCH_TYPES[p.qtype]).contiguous()
    if tuple(tensor.shape) != p.shape:
        raise AssertionError(f"{p.name}: produced shape {tuple(tensor.shape)}, planned {p.shape}")
    return tensor.view(_NUMPY_VIEWS[tensor.dtype]).numpy()


# --------------------------------------------------------------------------------------------
# Metadata
