"""Write a transformers (HF) checkpoint folder as a float GGUF file that stock llama.cpp runs.

Why our own converter rather than llama.cpp's ``convert_hf_to_gguf.py``: that script is not part of
any package on PyPI (gguf-py ships the format, not the model conversion), so cosmic-bake could not
rely on it being installed. What it knows about each architecture is small for the families we
bake, and gguf-py already holds the tables that matter: the architecture names
(:data:`gguf.MODEL_ARCH`), which tensors an architecture has (:data:`gguf.MODEL_TENSORS`), the
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

Float only: 2-D+ weights in the requested type, 1-D tensors (norms, biases) and MoE routers in
float32, as llama.cpp's own converter does (they are tiny, and the router picks the experts, so
its precision decides which experts run). Tensors are streamed one at a time (experts: one stacked
projection at a time) into a temporary file beside the output, renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
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

from cosmic_bake.errors import CosmicBakeError, first_line
from cosmic_bake.export.ggml_quant import FILE_TYPES
from cosmic_bake.export.gguf_io import add_metadata
from cosmic_bake.export.gguf_vocab import read_vocab
from cosmic_bake.export.safetensors_io import Listing, TensorInfo, list_weights, read_tensor

# HF ``model_type`` -> llama.cpp architecture name (a value of gguf.MODEL_ARCH_NAMES).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2moe",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}

OUTTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
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
        return math.prod(self.shape) * _TORCH_TYPES[self.qtype].itemsize


@dataclass(frozen=True)
class _Hparams:
    """The config values the conversion needs, normalised across architectures."""

    model_type: str
    arch: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context: int
    rms_eps: float
    tied: bool
    n_experts: int
    config: Any  # the transformers PretrainedConfig


# --------------------------------------------------------------------------------------------
# Entry point


def convert_folder(
    folder: Path,
    out_file: Path,
    outtype: str = "f32",
    *,
    metadata: Mapping[str, str | int | float] | None = None,
) -> ConvertReport:
    """Convert the HF model ``folder`` to the GGUF file ``out_file`` (float ``outtype``).

    ``metadata`` entries are added verbatim as extra GGUF keys (provenance such as the baked
    direction's hash), so a GGUF can be traced back to the run that made it. ``out_file`` is
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
    hp = _read_hparams(folder, warnings)
    listing = list_weights(folder)
    planned = _plan_tensors(hp, listing, OUTTYPES[outtype])
    vocab = read_vocab(folder, n_rows=_embedding_rows(planned), warnings=warnings)

    writer = gguf.GGUFWriter(path=None, arch=hp.arch)
    _add_model_keys(writer, hp, vocab.name, outtype, planned)
    vocab.add_to(writer)
    add_metadata(writer, metadata or {})
    for p in planned:
        raw = torch.empty((), dtype=_NUMPY_VIEWS[_TORCH_TYPES[p.qtype]]).numpy().dtype
        writer.add_tensor_info(p.name, p.shape, raw, p.nbytes, raw_dtype=p.qtype)

    tmp = out_file.with_name(f".{out_file.name}.{uuid.uuid4().hex[:12]}.tmp")  # same directory: rename is atomic
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with contextlib.ExitStack() as files:
            handles: dict[Path, Any] = {}
            for p in planned:
                writer.write_tensor_data(_produce(p, listing.folder, handles, files))
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


def _read_hparams(folder: Path, warnings: list[str]) -> _Hparams:
    """Read config.json (model_type first, so unsupported models fail with our message)."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CosmicBakeError(f"cannot read {path} ({first_line(err)})", "pass a transformers model folder") from err
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CosmicBakeError(
            f"GGUF export does not support model_type {model_type!r}",
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}; export with --format hf instead",
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CosmicBakeError(f"transformers cannot read {path} ({first_line(err)})", "fix config.json") from err
    n_heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    n_experts = int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)
    hp = _Hparams(
        model_type=model_type,
        arch=SUPPORTED_MODEL_TYPES[model_type],
        n_layers=int(config.num_hidden_layers),
        hidden=hidden,
        intermediate=int(config.intermediate_size),
        n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // n_heads),
        context=int(config.max_position_embeddings),
        rms_eps=float(config.rms_norm_eps),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        n_experts=n_experts,
        config=config,
    )
    _check_representable(hp, warnings)
    return hp


def _rope(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """RoPE parameters (transformers 5 ``rope_parameters``; per layer type for Gemma 3)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), Mapping):
        params = dict(params[layer_type])
    elif any(isinstance(v, Mapping) for v in params.values()):
        params = dict(params.get("full_attention") or next(v for v in params.values() if isinstance(v, Mapping)))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def _check_representable(hp: _Hparams, warnings: list[str]) -> None:
    """Refuse configs llama.cpp would silently run differently; warn where it only matters at length."""
    config = hp.config
    fix = "export with --format hf instead"
    for layer_type in ("full_attention", "sliding_attention") if hp.model_type == "gemma3_text" else (None,):
        rope = _rope(config, layer_type)
        if rope["rope_type"] not in ("default", "linear", "llama3") or (
            rope["rope_type"] == "llama3" and hp.arch != "llama"
        ):
            raise CosmicBakeError(f"GGUF export does not support rope_type {rope['rope_type']!r} yet", fix)
        if hp.model_type == "gemma3_text" and layer_type == "sliding_attention" and rope["rope_type"] != "default":
            raise CosmicBakeError("GGUF export: llama.cpp's Gemma 3 has no RoPE scaling on sliding layers", fix)
    if hp.model_type in ("gemma2", "gemma3_text"):
        # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models,
        # which it recognises by layer count; other query_pre_attn_scalar values cannot be expressed.
        big = hp.n_layers == (46 if hp.model_type == "gemma2" else 62)
        expected = hp.hidden // hp.n_heads if big else hp.head_dim
        scalar = getattr(config, "query_pre_attn_scalar", expected)
        if scalar != expected:
            raise CosmicBakeError(
                f"GGUF export: query_pre_attn_scalar {scalar} differs from the {expected} llama.cpp uses for "
                f"a {hp.n_layers}-layer {hp.model_type}",
                fix,
            )
        if hp.model_type == "gemma3_text" and getattr(config, "attn_logit_softcapping", None):
            raise CosmicBakeError("GGUF export: llama.cpp's Gemma 3 has no attention logit soft-capping", fix)
    if hp.model_type == "qwen2_moe":
        sparse_step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        if sparse_step != 1 or list(getattr(config, "mlp_only_layers", None) or []):
            raise CosmicBakeError(
                "GGUF export: llama.cpp's qwen2moe needs every layer sparse (no dense MLP layers)", fix
            )
        if getattr(config, "norm_topk_prob", False):
            raise CosmicBakeError("GGUF export: llama.cpp's qwen2moe does not renormalise top-k weights", fix)
    window = getattr(config, "sliding_window", None)
    uses_window = window and (hp.model_type != "qwen2" or getattr(config, "use_sliding_window", False))
    if uses_window and hp.model_type not in ("gemma2", "gemma3_text") and int(window) < hp.context:
        warnings.append(
            f"llama.cpp's {hp.arch} attends to the full context: sliding_window {window} is ignored, so outputs "
            f"differ from transformers beyond {window} tokens"
        )


# --------------------------------------------------------------------------------------------
# Tensors


def _plan_tensors(hp: _Hparams, listing: Listing, outtype: gguf.GGMLQuantizationType) -> list[_Planned]:
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
            planned.append(_Planned(gname, (hp.n_experts, *sources[0].shape), _qtype(gname, 3, outtype), sources))
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
        planned.append(
            _Planned(gname, info.shape, _qtype(gname, len(info.shape), outtype), (info,), _transform(hp, gname))
        )
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
    rope = _rope(hp.config)
    if rope["rope_type"] == "llama3":
        factors = _llama3_rope_factors(rope, _rope_dims(hp))
        planned.append(
            _Planned("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32, (), make=lambda: factors)
        )
    if "output.weight" not in produced and hp.arch in _OUTPUT_REQUIRED:
        embed = next(p for p in planned if p.name == "token_embd.weight")
        planned.append(_Planned("output.weight", embed.shape, embed.qtype, embed.sources))
    planned.sort(key=_tensor_order)
    return planned


def _rope_dims(hp: _Hparams) -> int:
    """How many dimensions of each head RoPE rotates (Phi-3 may rotate only a fraction)."""
    rope = _rope(hp.config)
    partial = rope.get("partial_rotary_factor", getattr(hp.config, "partial_rotary_factor", None)) or 1.0
    return int(hp.head_dim * float(partial))


def _llama3_rope_factors(rope: Mapping[str, Any], dims: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling as llama.cpp takes it: one divisor per rotated frequency.

    HF rescales each inverse frequency in place (long wavelengths divided by ``factor``, short ones
    kept, a smooth blend between); llama.cpp instead divides each angle by a ``rope_freqs`` entry,
    so the entry is the ratio of the original inverse frequency to HF's rescaled one.
    """
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / float(rope["rope_theta"]) ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return (inv_freq / scaled).float()


def _tensor_order(p: _Planned) -> tuple[int, str]:
    """Global tensors first, then block by block (llama.cpp does not care; readers of the file do)."""
    m = _BLOCK.match(p.name)
    return (int(m[1]) + 1 if m else 0, p.name)


def _qtype(gname: str, ndim: int, outtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if ndim <= 1 or any(part in gname for part in _ROUTERS):
        return gguf.GGMLQuantizationType.F32
    return outtype


def _same_as_embedding(listing: Listing, lm_head: TensorInfo) -> bool:
    """Whether a stored lm_head is a byte-identical copy of the embedding (then tying loses nothing)."""
    embed = next((t for n, t in listing.tensors.items() if n.endswith("embed_tokens.weight")), None)
    if embed is None or embed.shape != lm_head.shape or embed.dtype != lm_head.dtype:
        return False
    with open(listing.folder / lm_head.file, "rb") as a, open(listing.folder / embed.file, "rb") as b:
        return torch.equal(read_tensor(a, lm_head), read_tensor(b, embed))


def _transform(hp: _Hparams, gname: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
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


def _produce(p: _Planned, folder: Path, handles: dict[Path, Any], files: contextlib.ExitStack) -> np.ndarray:
    """Read (and stack, and edit) one output tensor and convert it to its GGUF type as a numpy array."""

    def read(info: TensorInfo) -> torch.Tensor:
        path = folder / info.file
        if path not in handles:
            handles[path] = files.enter_context(open(path, "rb"))
        return read_tensor(handles[path], info)

    if p.make is not None:
        tensor = p.make()
    elif len(p.sources) == 1:
        tensor = read(p.sources[0])
    else:
        dtype = _TORCH_TYPES[p.qtype]
        tensor = torch.empty(p.shape, dtype=dtype)
        for i, info in enumerate(p.sources):
            tensor[i] = read(info).to(dtype)
    if p.transform is not None:
        tensor = p.transform(tensor)
    tensor = tensor.to(_TORCH_TYPES[p.qtype]).contiguous()
    if tuple(tensor.shape) != p.shape:
        raise AssertionError(f"{p.name}: produced shape {tuple(tensor.shape)}, planned {p.shape}")
    return tensor.view(_NUMPY_VIEWS[tensor.dtype]).numpy()


# --------------------------------------------------------------------------------------------
# Metadata


def _add_model_keys(
    writer: gguf.GGUFWriter, hp: _Hparams, vocab_name: str, outtype: str, planned: list[_Planned]
) -> None:
    """Hyperparameter keys llama.cpp reads for ``hp.arch`` (names from gguf-py's GGUFWriter)."""
    config = hp.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(vocab_name)
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(_embedding_rows(planned))
    writer.add_context_length(hp.context)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.intermediate)
    writer.add_head_count(hp.n_heads)
    writer.add_head_count_kv(hp.n_kv_heads)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_layer_norm_rms_eps(hp.rms_eps)

    rope = _rope(config)
    writer.add_rope_dimension_count(_rope_dims(hp))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))

    if hp.n_experts:
        writer.add_expert_count(hp.n_experts)
        writer.add_expert_used_count(int(config.num_experts_per_tok))
    if hp.model_type == "qwen2_moe":
        writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        writer.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    if hp.model_type in ("gemma2", "gemma3_text"):
        # Per-layer SWA flags, so llama.cpp follows config.layer_types rather than its built-in period.
        layer_types = list(getattr(config, "layer_types", None) or [])
        if len(layer_types) != hp.n_layers:
            raise CosmicBakeError("config.json: layer_types does not list every layer", "re-download the model")
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if hp.model_type == "gemma2" and getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if hp.model_type == "gemma3_text":
        writer.add_rope_freq_base_swa(float(_rope(config, "sliding_attention")["rope_theta"]))
