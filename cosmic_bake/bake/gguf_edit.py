"""Bake linear removal straight into a GGUF file (GGUF in, GGUF out), without a float detour.

The same edit as :mod:`cosmic_bake.bake` (spec section 6), addressed by llama.cpp's tensor names:

============================  ===============================  ===========================
GGUF tensor                   numpy layout                     edit
============================  ===============================  ===========================
``token_embd.weight``         ``[vocab, d]``                   ``E (I - r r^T)`` (rows)
``position_embd.weight``      ``[positions, d]``               same
``blk.N.attn_output.weight``  ``[d, heads*head_dim]``          ``(I - v v^T) W``
``blk.N.ffn_down.weight``     ``[d, ff]``                      same
``blk.N.ffn_down_exps``       ``[experts, d, ff]``             same, per expert
``blk.N.ffn_down_shexp``      ``[d, ff_shared]``               same
``*.bias`` of those           ``[d]`` / ``[experts, d]``       ``b - (b . v) v``
============================  ===============================  ===========================

``v`` is ``r_hat``, or ``unit(g * r_hat)`` when a norm with gain ``g`` follows the writer
(Gemma 2/3 ``post_attention_norm`` / ``post_ffw_norm``; GGUF stores Gemma's gain with the ``+1``
already added, so ``g`` is the stored value). When the embedding is tied (no ``output.weight``),
the original ``token_embd`` is written again as ``output.weight``, byte for byte, so the output
head stays unedited as in the hook; architectures whose llama.cpp loader takes no separate
output head refuse instead of shipping a changed head.

Types: an edited tensor is dequantized (gguf-py), edited in float64 and quantized back to the
type it had, with llama.cpp's own quantizer (:mod:`cosmic_bake.export.ggml_quant`), when that
type can hold it; otherwise to ``edited_type`` (default q8_0); the report lists both. Tensors the
edit does not touch are copied byte for byte.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from cosmic_bake.artifacts import Direction, gguf_provenance
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export import ggml_quant
from cosmic_bake.export.gguf_io import OutTensor, architecture, copied, field_value, open_gguf, write_gguf
from cosmic_bake.math.projections import project_out_cols_, project_out_rows_, unit

# llama.cpp architectures whose residual writers we know (tested through tiny models of each).
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen2moe", "gemma2", "gemma3", "phi3")
# Architectures whose llama.cpp loader reads an optional separate ``output.weight`` (gemma2's
# always ties it to the embedding, so a Gemma 2 GGUF cannot carry an edited embedding exactly).
SEPARATE_HEAD_ARCHS = ("llama", "qwen2", "qwen2moe", "gemma3", "phi3")

_WRITER = re.compile(r"^blk\.(\d+)\.(attn_output|ffn_down|ffn_down_exps|ffn_down_shexp)(\.\d+)?\.(weight|bias)$")
_POST_NORMS = {"post_attention_norm": "attn_output", "post_ffw_norm": "ffn"}
_EMBEDDINGS = ("token_embd.weight", "position_embd.weight")
ROW_CHUNK = 8192  # embedding rows dequantized, edited and quantized at a time


@dataclass(frozen=True)
class GgufEdit:
    """One tensor's edit: ``kind`` ``rows`` (writer ``[.., d, k]``), ``embed``, ``bias`` or ``copy``."""

    name: str
    kind: str
    vector: str | None = "r"  # "r", "<block>.<attn_output|ffn>" for a post-norm direction, None: no removal
    source_type: str = ""
    out_type: str = ""
    constant: bool = False  # add the baked constant to every row after the removal
    block: int | None = None  # a writer's block (its removal strength); None: the embedding


def _vector_key(block: int, writer: str, post: set[str]) -> str:
    part = "attn_output" if writer == "attn_output" else "ffn"
    key = f"{block}.{part}"
    return key if key in post else "r"


def plan_edits(
    reader,
    d_model: int,
    edited_type: GGMLQuantizationType,
    always: bool = False,
    embeddings: str = "untie",
    remove: bool = True,
) -> list[GgufEdit]:
    """Every tensor's edit and output type; raises before anything is written if a type cannot hold a tensor.

    ``always`` writes every edited matrix as ``edited_type`` (e.g. q8_0 for edits more exact than
    a 4-bit source's own type allows), not only those whose source type cannot hold them.
    """
    post = set()
    for t in reader.tensors:
        m = re.match(r"^blk\.(\d+)\.(post_attention_norm|post_ffw_norm)\.weight$", t.name)
        if m:
            post.add(f"{m.group(1)}.{_POST_NORMS[m.group(2)]}")
    edits = []
    for t in reader.tensors:
        m = _WRITER.match(t.name)
        block = None
        if remove and m:
            kind = "bias" if m.group(4) == "bias" else "rows"
            block = int(m.group(1))
            vec = _vector_key(block, m.group(2), post)
        elif remove and t.name in _EMBEDDINGS and embeddings != "skip":
            kind, vec = "embed", "r"
        else:
            edits.append(GgufEdit(t.name, "copy", source_type=t.tensor_type.name, out_type=t.tensor_type.name))
            continue
        residual_axis = 1 if kind == "rows" else 0  # ne order: writers are [k, d, (experts)], the rest [d, ...]
        if int(t.shape[residual_axis]) != d_model:
            raise CosmicBakeError(
                f"{t.name} has shape {t.shape.tolist()}, with no dimension of the direction's size {d_model} "
                "where the residual stream should be",
                "use a direction selected on this model",
            )
        out_type = _out_type(t, edited_type, always and kind != "bias")
        edits.append(GgufEdit(t.name, kind, vec, t.tensor_type.name, out_type.name, block=block))
    return edits


def _out_type(tensor, edited_type: GGMLQuantizationType, always: bool) -> GGMLQuantizationType:
    row = int(tensor.shape[0])
    if not always and ggml_quant.writable(tensor.tensor_type, row) is None:
        return tensor.tensor_type
    reason = ggml_quant.writable(edited_type, row)
    if reason is not None:
        raise CosmicBakeError(
            f"{tensor.name} ({tensor.tensor_type.name}) cannot be written back as {tensor.tensor_type.name}, "
            f"and --edited-type {edited_type.name.lower()} cannot hold it either: {reason}",
            "pick --edited-type q8_0, f16 or f32",
        )
    return edited_type


def edit_vectors(reader, r_hat: torch.Tensor, edits: list[GgufEdit]) -> dict[str, torch.Tensor]:
    """``"r"`` -> r_hat; per post-norm key, ``unit(g * r_hat)`` with the stored gain (Gemma's +1 included)."""
    by_name = {t.name: t for t in reader.tensors}
    vectors = {"r": r_hat}
    for key in {e.vector for e in edits if e.vector not in ("r", None)}:
        block, part = key.split(".")
        norm = by_name[f"blk.{block}.{'post_attention_norm' if part == 'attn_output' else 'post_ffw_norm'}.weight"]
        gain = float_rows(norm, 0, 1).double().reshape(-1)
        vectors[key] = unit(gain * r_hat)
    return vectors


def float_rows(tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the tensor's 2-D row view, dequantized to float32."""
    data = np.asarray(tensor.data)
    flat = data.reshape(-1, data.shape[-1])
    return torch.from_numpy(ggml_quant.dequantize_rows(flat[start:stop], tensor.tensor_type).copy())


def _store(rows: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    return ggml_quant.quantize_rows(rows.numpy(), qtype)


def _each_row(rows: torch.Tensor, v: torch.Tensor | None, c: torch.Tensor | None, coeff: float = 1.0) -> torch.Tensor:
    """Rows with ``coeff`` times their component along ``v`` removed (if given), then ``c`` added (if given)."""
    if v is not None:
        project_out_cols_(rows, v, coeff=coeff)
    if c is not None:
        rows.copy_(rows.double() + c)
    return rows


def edited_data(
    tensor, edit: GgufEdit, v: torch.Tensor | None, c: torch.Tensor | None = None, coeff: float = 1.0
) -> np.ndarray:
    """The edited tensor's stored bytes (2-D: rows of the output type); ``c`` is added to every row.

    ``coeff`` is the removal's strength for this tensor (1: all of the component along ``v``)."""
    qtype = GGMLQuantizationType[edit.out_type]
    n_rows = int(np.prod([int(x) for x in tensor.shape[1:]]))
    if edit.kind == "embed":
        parts = []
        for a in range(0, n_rows, ROW_CHUNK):
            rows = float_rows(tensor, a, min(n_rows, a + ROW_CHUNK))
            parts.append(_store(_each_row(rows, v, c, coeff), qtype))
        return np.concatenate(parts)
    if edit.kind == "bias":
        return _store(_each_row(float_rows(tensor, 0, n_rows), v, c, coeff), qtype)
    d = int(tensor.shape[1])
    out = []
    for e in range(n_rows // d):  # one matrix [d, k] per expert (one for dense writers)
        w = float_rows(tensor, e * d, (e + 1) * d)
        out.append(_store(project_out_rows_(w, v, coeff=coeff), qtype))
    return np.concatenate(out)


def _out_tensor(
    tensor, edit: GgufEdit, v: torch.Tensor | None, c: torch.Tensor | None = None, coeff: float = 1.0
) -> OutTensor:
    qtype = GGMLQuantizationType[edit.out_type]
    shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
    nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * ggml_quant.row_bytes(qtype, shape[-1])
    return OutTensor(tensor.name, qtype, shape, nbytes, lambda: edited_data(tensor, edit, v, c, coeff))


# llama.cpp architectures that read an optional ``ffn_down`` bias (in dense blocks), and whose
# embedding is used unscaled, so an added constant fits a GGUF without changing the architecture.
CONSTANT_ARCHS = ("llama",)


def _constant_edit(edits: list[GgufEdit], by_name: dict, d: Direction, arch: str, edited_type) -> str:
    """Mark (or create) the tensor that carries an add / affine constant; returns its name.

    At layer ``l > 0`` the constant must enter after block ``l - 1``'s last writer, its MLP: llama.cpp's
    'llama' graph reads ``blk.N.ffn_down.bias`` only in dense blocks. Mixtral files are 'llama' too,
    with ``ffn_*_exps`` experts instead, and there the loader reads no FFN bias at all (an extra one
    makes it refuse the file: wrong number of tensors). ``attn_output.bias`` is read in every block,
    but it enters before the MLP, which would then see the constant: not the hook. So an MoE block
    is refused, as in the safetensors route (:func:`~cosmic_bake.bake.constant.place_constant`),
    decided by the tensors the block has, not by the architecture's name.
    """
    if arch not in CONSTANT_ARCHS:
        raise CosmicBakeError(
            f"mode '{d.mode}' needs an added bias, which llama.cpp's '{arch}' graph has no place for in this file",
            "pass --outtype (e.g. q8_0) to bake through safetensors, which re-expresses it where possible",
        )
    block = d.layer - 1
    if d.layer > 0 and f"blk.{block}.ffn_down.weight" not in by_name:
        experts = f"blk.{block}.ffn_down_exps.weight" in by_name
        raise CosmicBakeError(
            f"cannot bake a constant at the input of block {d.layer}: block {block}: "
            + (
                "its MLP output is a mixture of experts (ffn_down_exps), with no bias llama.cpp reads after it"
                if experts
                else "it has no dense ffn_down.weight to carry a bias"
            ),
            "use the runtime hook (cosmic-bake eval --intervention ...), or a direction at layer 0",
        )
    target = "token_embd.weight" if d.layer == 0 else f"blk.{block}.ffn_down.bias"
    for i, e in enumerate(edits):
        if e.name == target:
            kind = "embed" if d.layer == 0 else "bias"
            out_type = e.out_type if e.kind != "copy" else _out_type(by_name[target], edited_type, False).name
            vec = e.vector if e.kind != "copy" else None
            edits[i] = GgufEdit(target, kind, vec, e.source_type, out_type, constant=True)
    return target


@dataclass
class GgufBakeReport:
    """What a GGUF-to-GGUF bake did (JSON-serialisable)."""

    output: str
    architecture: str
    d_model: int
    direction_digest: str
    layer: int
    position: int
    mode: str
    edits: dict[str, int]
    types: dict[str, str]  # edited tensor -> "SOURCE -> OUT"
    requantized_as_other_type: list[str]
    output_head: str
    constant: str
    source_bytes: int
    bytes_written: int
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def bake_gguf_file(
    source: Path,
    direction: Direction,
    out: Path,
    *,
    source_hash: str,
    edited_type: str = "q8_0",
    edited_type_always: bool = False,
    embeddings: str = "untie",
    identity: dict | None = None,
    source_name: str | None = None,
) -> GgufBakeReport:
    """Write ``out`` (a temporary path the caller renames): ``source`` with the removal baked in.

    ``identity`` replaces the source's ``general.name`` and base-model keys
    (:func:`~cosmic_bake.export.lineage.gguf_identity`), so llama.cpp's model list tells the edited
    file from the original; ``source_name`` is the portable name ``cosmic_bake.source_model`` records.
    """
    t0 = time.perf_counter()
    reader = open_gguf(source)
    arch = architecture(reader)
    if arch not in SUPPORTED_ARCHS:
        raise CosmicBakeError(
            f"GGUF architecture '{arch}' is not supported for baking",
            f"supported: {', '.join(SUPPORTED_ARCHS)}; or bake the transformers model with --format hf",
        )
    d_model = int(field_value(reader, f"{arch}.embedding_length", 0))
    if direction.direction.numel() != d_model:
        raise CosmicBakeError(
            f"the direction has {direction.direction.numel()} values but the GGUF's embedding_length is {d_model}",
            "use a direction selected on this model",
        )
    qedit = ggml_quant.tensor_type(edited_type)
    edits = plan_edits(reader, d_model, qedit, edited_type_always, embeddings, remove=direction.mode != "add")
    names = {t.name for t in reader.tensors}
    by_name = {t.name: t for t in reader.tensors}
    constant, target = None, None
    if direction.mode == "scale":
        raise CosmicBakeError(
            "a GGUF source keeps its tensor types, and the scale edit is baked through safetensors only",
            "pass --outtype (f32, f16, q8_0, q4_k_m, ...)",
        )
    if direction.mode != "ablate":
        target = _constant_edit(edits, by_name, direction, arch, qedit)
        constant = direction.hook().constant()
    head = "separate (unedited)"
    out_tensors = []
    r_hat = unit(direction.direction.double())
    vectors = edit_vectors(reader, r_hat, edits)
    for e in edits:
        t = by_name[e.name]
        c = constant if e.constant else None
        v = vectors[e.vector] if e.vector is not None else None
        out_tensors.append(copied(t) if e.kind == "copy" else _out_tensor(t, e, v, c, direction.coeff(e.block)))
        if e.name == "token_embd.weight" and e.kind == "embed" and "output.weight" not in names:
            if arch not in SEPARATE_HEAD_ARCHS:
                raise CosmicBakeError(
                    f"llama.cpp's '{arch}' loader has no separate output head, so the tied embedding cannot be untied",
                    "pass --embeddings skip (the result then differs from the hook), or bake with --format hf",
                )
            base = copied(t)
            out_tensors.append(OutTensor("output.weight", base.qtype, base.shape, base.nbytes, base.data))
            head = f"untied: output.weight = original token_embd ({t.tensor_type.name})"
    if target is not None and target not in names:  # a new bias, stored in float32
        c32 = constant.to(torch.float32).numpy()
        out_tensors.append(OutTensor(target, GGMLQuantizationType.F32, (d_model,), 4 * d_model, lambda: c32))
    warnings = []
    if embeddings == "skip":
        head = "unchanged (embedding not edited)"
        warnings.append(
            "embeddings skipped: the token embedding still writes the direction into the residual stream, "
            "so the baked model differs from the runtime hook; verify will report the difference"
        )
    timings = {"plan": time.perf_counter() - t0}
    t = time.perf_counter()
    meta = gguf_provenance(
        direction,
        source_hash,
        {"cosmic_bake.edited_type": edited_type + (" (all edited)" if edited_type_always else " (fallback)")},
        source_name,
    )
    meta.update(identity or {})
    write_gguf(reader, out, out_tensors, meta)
    timings["write"] = time.perf_counter() - t
    changed = [e for e in edits if e.kind != "copy"]
    constant_note = ""
    if target is not None:
        constant_note = f"added to {target}" + ("" if target in names else " (new float32 tensor)")
    return GgufBakeReport(
        output=Path(out).name,
        architecture=arch,
        d_model=d_model,
        direction_digest=direction.digest,
        layer=direction.layer,
        position=direction.position,
        mode=direction.mode,
        edits=dict(Counter(e.kind for e in edits)),
        types={e.name: f"{e.source_type} -> {e.out_type}" for e in changed},
        requantized_as_other_type=[e.name for e in changed if e.source_type != e.out_type],
        output_head=head,
        constant=constant_note,
        source_bytes=Path(source).stat().st_size,
        bytes_written=Path(out).stat().st_size,
        timings=timings,
        warnings=warnings,
    )
