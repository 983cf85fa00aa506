"""Weight-space check of a bake (issue 13): the stored weights carry the edit, whatever the prompts.

``verify`` compares logits on prompts; this compares weights. For every tensor the bake edits,
the component of the *stored* weights (dequantized, for GGUF) along the edit's unit vector ``u``
must be what the baked mode prescribes, up to what rounding to the stored type leaves, and must
differ clearly from the unedited tensor's.

Each edited tensor is seen as a stack ``X [m, d]`` of residual-stream vectors (a writer ``W [d, k]``
gives its ``k`` columns, an embedding its rows, a bias itself); its component along ``u`` is
``c = X u``. Every baked mode changes a tensor only along ``u``, affinely:
``c_t = a c_o + b`` with

* ``a = 1 - k |v|^2`` where the tensor is projected with the bake's vector ``v`` (``r_hat``, or
  ``unit(g * r_hat)`` where a norm with gain ``g`` follows the writer) and coefficient ``k``
  (1: ``ablate`` / ``affine``; ``-beta``: ``scale``); ``a = 1`` where it is not (mode ``add``).
  ``|v|`` is not exactly 1 (``unit`` divides by ``|r| + 1e-8``), and taking the bake's own ``v``
  makes the prescription exact to float64, so float32 outputs are judged at float32 rounding.
* ``b = (constant . u) / s`` on the one tensor that carries an ``add`` / ``affine`` / ``scale``
  constant (embedding rows, divided by the embedding scale ``s``; or a bias), else 0.

Which tensors are edited, how (rows / cols / expert_rows / expert_cols / bias), with which vector
and where the constant goes comes from the bake's own planning (:func:`cosmic_bake.bake.plan.plan_bake`,
:func:`cosmic_bake.bake.gguf_edit.plan_edits`), not from a second reading of the layout.

Metric, per unit (one tensor; one expert of a stacked expert tensor), with ``X_t`` the target
(``X_o`` moved along ``u`` to ``c_t``) and ``E = X_b - X_t`` what the stored weights miss it by:

* ``deviation = |c_b - c_t|`` (2-norm over the unit's ``m`` vectors) = ``|E u|``;
* ``residual = deviation / |c_o - c_t|``: 0 for an exact edit, about 1 for no edit at all;
* ``rounding``: the edit must not change ``X`` across ``u``, so ``E (I - u u^T)`` is what rounding
  to the stored type left there. Rounding along ``u`` is estimated from it twice, and the larger
  taken: isotropically, ``|E (I - u u^T)|_F / sqrt(d - 1)``, and per
  coordinate, ``sqrt(sum_i u_i^2 S_i / (1 - sum_i u_i^4))`` with ``S_i`` coordinate ``i``'s
  squared orthogonal error summed over the unit. The second matters where rounding is not the
  same on every coordinate (float rounding scales with the value: real models have a few
  residual coordinates with much larger weights, and a refusal direction may lean on them); the
  ``1 - sum u^4`` undoes the part of ``S_i`` the projection removed (exact for equal rounding).
* ``floor = |(round(X_t) - X_t) u|`` for a float stored type (float32, float16, bfloat16): what
  the best file of that type deviates by. Rounding is not independent of the edit: where the
  edit moves a weight by under half a step, nearest rounding puts it back, so a fraction of the
  component stays, along ``u``, growing with ``d`` (bfloat16 at ``d = 4096``, Llama-8B's width:
  ~1% of the edit, deviation / rounding ~6, which failed a perfect bake before the floor).
* ``allowance = K * rounding + floor + eps``, ``eps = 1e-9 |X_t|_F / sqrt(d)`` (float64
  arithmetic only; 30x below float32 rounding).

A unit **passes** when ``deviation <= allowance`` and ``residual <= 0.5``; **fails** when
``deviation > allowance``; is **unresolved** when within the allowance but with ``residual > 0.5``,
i.e. the edit itself is under twice the allowance, so the stored type can show neither its
presence nor its absence. A tensor takes its worst unit's status; a class (per stored type)
passes when no tensor fails and at least one shows the edit, the check when every class passes.

Why ``K = 4``: for independent rounding errors ``E u`` is a sum of ``d`` small terms, close to
Gaussian, and ``deviation / rounding`` is ``sqrt(chi2_m / m)``: for a bias (``m = 1``, the worst
case) it exceeds 4 with probability 6e-5, for ``m >= 8`` below 1e-12; the rest of the margin
covers rounding that depends on the coordinate more than the per-coordinate estimate sees. A
missing edit deviates by ``|c_o - c_t|``, far beyond: removing the direction from a random
tensor changes its component by about ``|X|_F / sqrt(d)``, rounding by a fraction of that set by
the type's precision (float32 ~1e-7, bfloat16 ~3e-3, q8_0 ~1e-2, 4-bit ~0.1). Why residual 0.5:
the edit must have moved the component at least half way, beyond any plausible rounding.

An unedited file fails: ``X_b = X_o`` puts the whole prescribed change in ``E u`` and nothing
across ``u``, so the allowance collapses to ``eps`` (ratios ~1e9). A wrong direction, or Gemma's
gain left out of ``u``, fails: the component along ``u`` stays, and the change lands across ``u``
as one structured vector, which reads as rounding about ``sqrt(d - 1)`` times smaller than the
deviation (deviation / allowance measured about 2 at ``d = 64``, 4 at ``d = 256``; so for a single
bias vector at small ``d`` such a change may come out "unresolved" rather than "fail").

Quantized sources rounded again to a type of the same precision (``bake --format gguf`` with
source types; also ``--outtype q4_k_m`` from a Q4_1 GGUF): the source weights sit on a grid,
and where the edit moves a weight by less than half a step, nearest rounding puts it back. The
error is then the edit itself, along ``u``, not rounding: part of the component stays (4-bit at
``d = 256``: residual ~0.4; SmolLM2's Q4_1 writers, ``d = 576``: ~0.5), and this check fails
those tensors, as it should (their stored weights still write the direction);
``--edited-type-always`` (q8_0) keeps the edit (residual ~0.006). Finer types lose less (Q8_0 /
Q6_K re-rounded: residual ~0.01 / 0.05, within the allowance at these widths), but the loss
grows with ``d``.

Readers stream one tensor at a time (GGUF embeddings in row chunks): :func:`check_folder`
(transformers folders), :func:`~cosmic_bake.verify.weights_gguf.check_gguf` (GGUF outputs,
against the unedited GGUF or the transformers folder they were converted from), and
:func:`weight_check`, which picks one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cosmic_bake.artifacts import Direction
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math.projections import unit
from cosmic_bake.verify.weights_gguf import GgufTensors, check_gguf_files
from cosmic_bake.verify.weights_math import (
    check_tensor,
    prescription,
)
from cosmic_bake.verify.weights_report import (
    WeightCheck,
    baked_direction,
    baked_embeddings,
    check_size,
    class_notes,
    class_rows,
    tensor_result,
)

# --------------------------------------------------------------------------------------------
# Pure math: tensors in, numbers out


# --------------------------------------------------------------------------------------------
# Report


# --------------------------------------------------------------------------------------------
# What was baked: the mode recorded in the output, the embedding handling from its manifest


# --------------------------------------------------------------------------------------------
# Transformers folders


def _hf_class(layout, edit) -> str:
    """Tensor class of a planned safetensors edit, from the bake's layout."""
    if edit.kind == "zeros":
        return "bias"
    role = layout.writers.get(layout.memory_name(edit.source))
    if role is None:
        return "embedding"
    if role.role == "bias":
        return "bias"
    if edit.kind.startswith("expert_") or "expert" in role.writer:
        return "experts"
    return "attn_output" if role.part == "attn" else "mlp_down"


def _read(folder: Path, info) -> torch.Tensor:
    from cosmic_bake.export.safetensors_read import read_tensor

    with open(folder / info.file, "rb") as fh:
        return read_tensor(fh, info)


def check_folder(
    source_folder: str | Path,
    baked_folder: str | Path,
    direction: Direction | str | Path,
    *,
    embeddings: str | None = None,
) -> WeightCheck:
    """Check a baked transformers folder against the folder it was baked from.

    ``embeddings`` (``untie`` / ``skip``) defaults to what the baked manifest records. The plan
    is the bake's own (:func:`~cosmic_bake.bake.plan.plan_bake` with the constant placed as
    :func:`~cosmic_bake.bake.folder.bake_folder` places it); tensors are read one at a time.
    """
    from cosmic_bake.bake.apply import edit_vectors
    from cosmic_bake.bake.constant import place_constant
    from cosmic_bake.bake.folder import load_config
    from cosmic_bake.bake.plan import add_constant, plan_bake
    from cosmic_bake.export.safetensors_read import list_weights
    from cosmic_bake.model.layout import model_layout, text_config

    folder, baked = Path(source_folder), Path(baked_folder)
    from cosmic_bake.artifacts import baked_settings

    d = baked_direction(direction, baked_settings(str(baked)))
    config = load_config(folder)
    check_size(d, int(getattr(text_config(config), "hidden_size", 0) or 0))
    listing, out = list_weights(folder), list_weights(baked)
    layout = model_layout(config)
    placement = None
    if d.mode != "ablate":
        shapes = {n: (tuple(i.shape), i.dtype) for n, i in listing.tensors.items()}
        source_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        at = 0 if d.mode == "scale" else d.layer
        placement = place_constant(layout, shapes, source_config, at, layout.embed_scale)
    emb = baked_embeddings(baked, embeddings)
    plan = plan_bake(
        layout,
        listing,
        embeddings=emb,
        remove=d.mode != "add",
        embedding_changes=d.mode != "add" or (placement is not None and placement.kind == "embedding"),
    )
    if placement is not None:
        add_constant(plan, placement)
    r_hat = unit(d.direction.double())
    vectors = edit_vectors(plan, listing, r_hat)
    constant = d.hook().constant() if placement is not None else None
    results = []
    for e in plan.edits():
        if e.kind in ("copy", "zeros") and not e.constant:
            continue
        if e.kind == "zeros":  # a new bias carrying the constant; missing from an unedited folder
            x_o, source_type = torch.zeros(e.shape, dtype=torch.float64), "(new)"
            info_b = out.tensors.get(e.name)
            stored_type = info_b.dtype if info_b is not None else "(missing)"
            x_b = _read(out.folder, info_b) if info_b is not None else x_o
        else:
            if e.name not in out.tensors:
                raise CosmicBakeError(
                    f"{baked} has no tensor {e.name}, which the bake writes", "pass the folder baked from this model"
                )
            info_b = out.tensors[e.name]
            x_b, stored_type = _read(out.folder, info_b), info_b.dtype
            info = listing.tensors[e.source]
            x_o, source_type = _read(listing.folder, info), info.dtype
        if x_o.shape != x_b.shape:
            raise CosmicBakeError(
                f"{e.name} has shape {list(x_b.shape)} in {baked} but {list(x_o.shape)} in the source",
                "pass the folder baked from this model",
            )
        projected = e.kind not in ("copy", "zeros")
        target = prescription(
            r_hat,
            vectors[e.vector] if projected else None,
            d.coeff(e.block),
            constant if e.constant else None,
            placement.scale if (e.constant and placement is not None) else 1.0,
        )
        # where the constant rides on an unprojected tensor (mode add): the embedding's rows or a bias
        carrier = "cols" if placement is not None and placement.kind == "embedding" else "bias"
        shape_kind = {"zeros": "bias", "copy": carrier}.get(e.kind, e.kind)
        units = check_tensor(x_o, x_b, shape_kind, target)
        results.append(tensor_result(e.name, _hf_class(layout, e), source_type, stored_type, units))
    rows, notes = class_rows(results), class_notes(results, emb)
    return WeightCheck("hf", d.mode, d.alpha, str(folder), str(baked), rows, results, notes=notes)


# --------------------------------------------------------------------------------------------
# GGUF outputs


# --------------------------------------------------------------------------------------------
# Entry point


def weight_check(
    original: str | Path,
    baked_path: str | Path,
    direction: Direction | str | Path,
    *,
    embeddings: str | None = None,
) -> WeightCheck | None:
    """The weight-space check for ``verify ORIGINAL BAKED --direction RUN``, whatever the formats.

    ``original`` is a model spec (folder, .gguf, builtin or Hub id). A baked ``.gguf`` is checked
    against the original GGUF, or against the transformers folder it was converted from; a
    baked folder against the safetensors folder the bake read (a GGUF original's dequantized
    cache, as ``bake`` uses). LoRA adapters (PEFT folders, llama.cpp adapters) leave the base
    weights unchanged, so there is nothing to check: None.
    """
    from cosmic_bake.model.loading import resolve, source_folder

    baked = Path(baked_path)
    if baked.is_dir() and (baked / "adapter_config.json").is_file():
        return None
    if baked.suffix.lower() == ".gguf":
        from cosmic_bake.export.gguf_io import field_value

        out = GgufTensors(baked)
        if field_value(out.reader, "general.type") == "adapter":
            return None
        spec = resolve(str(original))
        source = spec.path if spec.kind == "gguf" else source_folder(str(original))[1]
        return check_gguf_files(Path(source), out, direction, embeddings)
    if not (baked / "config.json").is_file():
        raise CosmicBakeError(f"{baked} is neither a .gguf file nor a model folder", "pass the baked output")
    return check_folder(source_folder(str(original))[1], baked, direction, embeddings=embeddings)
