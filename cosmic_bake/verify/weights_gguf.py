"""The weight-space check of a baked GGUF: against the source GGUF, or the source folder converted on the fly."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cosmic_bake.artifacts import Direction
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math.projections import unit
from cosmic_bake.verify.weights_math import (
    GGUF_ROW_CHUNK,
    Moments,
    Target,
    UnitResult,
    judge,
    moments,
    prescription,
)
from cosmic_bake.verify.weights_report import (
    WeightCheck,
    baked_direction,
    baked_embeddings,
    check_size,
    class_notes,
    class_rows,
    gguf_settings,
    tensor_result,
)

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


class GgufTensors:
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
        from cosmic_bake.bake.gguf_edit import float_rows

        return float_rows(self.by_name[name], start, stop)

    def gain(self, name: str) -> torch.Tensor:
        """A norm's stored gain (Gemma's ``+1`` included), as ``bake.gguf_edit.edit_vectors`` reads it."""
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
        """Header-only stand-in for a ``GGUFReader``, enough for :func:`~cosmic_bake.bake.gguf_edit.plan_edits`."""
        from gguf import GGMLQuantizationType

        tensors = [
            SimpleNamespace(name=n, shape=np.array(list(reversed(p.shape))), tensor_type=GGMLQuantizationType.F32)
            for n, p in self.planned.items()
        ]
        return SimpleNamespace(tensors=tensors)


def _gguf_vectors(src, r_hat: torch.Tensor, keys: set[str]) -> dict[str, torch.Tensor]:
    """As :func:`cosmic_bake.bake.gguf_edit.edit_vectors`: ``unit(g * r_hat)`` with the stored gain ``g``."""
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
    The edited tensors are those :func:`~cosmic_bake.bake.gguf_edit.plan_edits` edits.
    """
    return check_gguf_files(Path(source), GgufTensors(Path(baked_gguf)), direction, embeddings)


def check_gguf_files(
    source: Path, out: GgufTensors, direction: Direction | str | Path, embeddings: str | None
) -> WeightCheck:
    from gguf import GGMLQuantizationType

    from cosmic_bake.bake.gguf_edit import plan_edits
    from cosmic_bake.export.gguf_io import architecture, field_value

    baked = out.path
    d = baked_direction(direction, gguf_settings(out.reader))
    if source.is_dir():
        src = _ConvertedFolder(source)
        reader, d_model, arch = src.reader(), src.hp.hidden, src.hp.arch
    else:
        src = GgufTensors(source)
        reader, arch = src.reader, architecture(src.reader)
        d_model = int(field_value(src.reader, f"{arch}.embedding_length", 0))
    check_size(d, d_model)
    emb = baked_embeddings(baked, embeddings)
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
            d.coeff(getattr(e, "block", None)),
            constant if carrier else None,
            divisor if carrier and layout == "cols" else 1.0,
        )
        stored_type = out.type_name(e.name) if e.name in out.by_name else "(missing)"
        units = _judge_pairs(pairs, tgt, per_pair=layout == "rows", stored=GGUF_FLOATS.get(stored_type.upper()))
        results.append(tensor_result(e.name, gguf_class(e.name), source_type, stored_type, units))
    kind = "gguf (from a transformers folder)" if source.is_dir() else "gguf"
    rows, notes = class_rows(results), class_notes(results, emb)
    return WeightCheck(kind, d.mode, d.alpha, str(source), str(baked), rows, results, notes=notes)


# GGUF float types read back widened: the type their values were rounded to (quantized types: none)
GGUF_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _judge_pairs(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], target: Target, per_pair: bool, stored: torch.dtype | None
) -> list[UnitResult]:
    """Judge each pair as its own unit (experts), or all pairs as chunks of one unit.

    ``stored`` is the baked tensor's float type (None for quantized types: no rounding floor).
    """
    floor_type = stored or torch.float64  # widened quantized values: float64 means "no floor"
    if per_pair:
        return [judge(moments(a, b, target, floor_type), target.u) for a, b in pairs]
    total: Moments | None = None
    for a, b in pairs:
        mo = moments(a, b, target, floor_type)
        total = mo if total is None else total + mo
    if total is None:  # pragma: no cover - every planned tensor has rows
        raise RuntimeError("no rows to check")
    return [judge(total, target.u)]
