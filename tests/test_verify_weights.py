"""Weight-space check of baked outputs (issue 13): the stored component along the direction.

Per storage type (hf folders in f32 / f16 / bf16; GGUF in f32, f16, q8_0, q4_0, q4_1, Q4_K / Q6_K)
the right edit passes, the unedited file fails in every edited class, and a wrong direction fails.
Plus a Gemma model (post-norm vectors ``unit(g * r)``), the ``affine`` / ``scale`` / ``add``
prescriptions, the transformers -> GGUF route, and a 4-bit source re-rounded to its own type on a
256-wide model, where nearest rounding undoes much of the edit and the check says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny_models
import torch

import cosmic_bake.bake.folder as bake_module
from cosmic_bake.artifacts import Direction
from cosmic_bake.bake.folder import bake_folder
from cosmic_bake.bake.gguf import bake_to_gguf
from cosmic_bake.export.ggml_quant import quantize_file
from cosmic_bake.export.gguf_convert import convert_folder
from cosmic_bake.math.projections import unit
from cosmic_bake.verify.weights import check_folder, weight_check
from cosmic_bake.verify.weights_gguf import check_gguf
from cosmic_bake.verify.weights_math import CLASSES, check_tensor, prescription
from cosmic_bake.verify.weights_report import WeightCheck

pytestmark = pytest.mark.usefixtures("one_thread")

MATRICES = {"embedding", "attn_output", "mlp_down"}


def direction(size: int, seed: int = 1, mode: str = "ablate", alpha: float = 0.0, layer: int = 1) -> Direction:
    """A seeded random direction (and reference point) of ``size`` values, for any model."""
    g = torch.Generator().manual_seed(seed)
    return Direction(
        direction=2.0 * torch.randn(size, generator=g, dtype=torch.float64),
        reference=torch.randn(size, generator=g, dtype=torch.float64),
        layer=layer,
        position=-1,
        mode=mode,
        alpha=alpha,
    )


def run_dir(tmp: Path, d: Direction, name: str = "run") -> Path:
    folder = tmp / name
    folder.mkdir()
    d.save(folder)
    return folder


def verdicts(check: WeightCheck) -> dict[str, bool]:
    """Per class: passed (over every stored type of the class)."""
    out: dict[str, bool] = {}
    for row in check.rows:
        out[row.cls] = out.get(row.cls, True) and row.passed
    return out


def assert_passes(check: WeightCheck, classes: set[str]) -> None:
    assert check.passed and set(verdicts(check)) == classes, "\n".join(check.lines())
    assert all(t.status == "pass" for t in check.tensors), "\n".join(check.lines())


def assert_every_class_fails(check: WeightCheck, classes: set[str]) -> None:
    assert not check.passed and set(verdicts(check)) == classes
    assert not any(verdicts(check).values()), "\n".join(check.lines())


@pytest.fixture(scope="module")
def wide_factory(tmp_path_factory):
    """Tiny models 256 wide (hidden, heads x head_dim, MLP), so every GGUF row fits K-quant blocks of 256.

    Built here with the tiny-model constants patched (not through the shared session factory,
    whose cache would hand these to other tests).
    """
    cache: dict[tuple, Path] = {}

    def make(arch: str, **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(tiny_models, "NUM_HEADS", 16)
                mp.setattr(tiny_models, "NUM_KV_HEADS", 4)
                folder = tmp_path_factory.mktemp(f"wide_{arch}")
                cache[key] = tiny_models.make_tiny_model(arch, folder, hidden_size=256, intermediate_size=256, **kw)
        return cache[key]

    return make


# --------------------------------------------------------------------------------------------
# The metric on plain tensors


def test_metric_passes_rounding_and_fails_missing_or_partial_edits():
    g = torch.Generator().manual_seed(0)
    d, k = 128, 96
    w = torch.randn(d, k, generator=g, dtype=torch.float64)
    r_hat = unit(torch.randn(d, generator=g, dtype=torch.float64))
    ablate = prescription(r_hat, r_hat)
    exact = w - torch.outer(r_hat, r_hat @ w)
    [ok] = check_tensor(w, exact.to(torch.bfloat16), "rows", ablate)
    assert ok.status == "pass" and ok.ratio < 0.5 and ok.residual < 0.02
    [none] = check_tensor(w, w.to(torch.bfloat16), "rows", ablate)
    assert none.status == "fail" and none.residual == pytest.approx(1.0, abs=0.02)
    [half] = check_tensor(w, (w - 0.5 * torch.outer(r_hat, r_hat @ w)).to(torch.bfloat16), "rows", ablate)
    assert half.status == "fail" and half.residual == pytest.approx(0.5, abs=0.02)
    # scale by 1 + beta: the same stored tensor fails the ablate prescription and passes its own
    scaled = w + 0.5 * torch.outer(r_hat, r_hat @ w)
    [s] = check_tensor(w, scaled.float(), "rows", prescription(r_hat, r_hat, coeff=-0.5))
    assert s.status == "pass" and s.residual < 1e-6
    assert check_tensor(w, scaled.float(), "rows", ablate)[0].status == "fail"
    # rows of an embedding, per expert of a stacked tensor: one unit each
    experts = torch.stack([exact, w])
    results = check_tensor(experts.transpose(1, 2), experts.transpose(1, 2), "expert_cols", prescription(r_hat, r_hat))
    assert [u.status for u in results] == ["fail", "fail"]  # the "original" here is the edit: nothing moved
    assert [u.status for u in check_tensor(torch.stack([w, w]), experts.float(), "expert_rows", ablate)] == [
        "pass",
        "fail",
    ]


def test_bfloat16_at_llama_width_is_judged_against_its_rounding_floor():
    """A bf16 writer 4096 wide (Llama-8B's residual): nearest rounding puts back the coordinates the
    edit moves by under half a step, which leaves ~1% of the component, correlated with ``u``. The
    best bf16 file deviates by exactly that floor; without it the check failed a perfect bake."""
    from cosmic_bake.math.projections import project_out_rows_
    from cosmic_bake.verify.weights_math import judge, moments, tensor_units

    g = torch.Generator().manual_seed(0)
    d, k = 4096, 256
    w = (torch.randn(d, k, generator=g) / 64).to(torch.bfloat16)
    r_hat = unit(torch.randn(d, generator=g, dtype=torch.float64))
    ablate = prescription(r_hat, r_hat)
    baked = project_out_rows_(w.clone(), r_hat)
    [ok] = check_tensor(w, baked, "rows", ablate)
    assert ok.status == "pass" and ok.deviation == pytest.approx(ok.floor, rel=1e-6)
    assert 0.003 < ok.residual < 0.03  # the part of the edit bf16 cannot store
    [x_o], [x_b] = tensor_units(w, "rows"), tensor_units(baked, "rows")
    no_floor = judge(moments(x_o, x_b, ablate, stored=torch.float64), ablate.u)
    assert no_floor.status == "fail"  # what the check said before the floor
    [none] = check_tensor(w, w.clone(), "rows", ablate)
    assert none.status == "fail" and none.residual == pytest.approx(1.0, abs=0.02)
    half = (w.double() - 0.5 * torch.outer(r_hat, r_hat @ w.double())).to(torch.bfloat16)
    [h] = check_tensor(w, half, "rows", ablate)
    assert h.status == "fail" and h.residual == pytest.approx(0.5, abs=0.03)


# --------------------------------------------------------------------------------------------
# transformers folders


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_folder_right_edit_passes_unedited_and_wrong_direction_fail(dtype, tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama", tied=True, bias=True, num_layers=2, dtype=dtype)
    d = direction(tiny_models.HIDDEN_SIZE)
    bake_folder(source, d, tmp_path / "baked")
    classes = MATRICES | {"bias"}
    check = check_folder(source, tmp_path / "baked", d)
    assert_passes(check, classes)
    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    assert {r.stored_type for r in check.rows} == {codes[dtype]}
    assert_every_class_fails(check_folder(source, source, d), classes)
    wrong = check_folder(source, tmp_path / "baked", direction(tiny_models.HIDDEN_SIZE, seed=7))
    assert not wrong.passed and not any(verdicts(wrong)[c] for c in MATRICES), "\n".join(wrong.lines())
    report = json.loads(json.dumps(check.to_dict()))
    assert report["passed"] and [c["cls"] for c in report["classes"]] == [c for c in CLASSES if c in classes]


def test_gemma_post_norm_vectors(wide_factory, tmp_path, monkeypatch):
    """Writers followed by a norm are edited along unit(g * r): right; plain r (gain ignored) fails."""
    source = wide_factory("gemma2", tied=True, num_layers=2)
    d = direction(256)
    bake_folder(source, d, tmp_path / "baked")
    assert_passes(check_folder(source, tmp_path / "baked", d), MATRICES)
    plain = bake_module.edit_vectors
    monkeypatch.setattr(bake_module, "edit_vectors", lambda plan, listing, r: dict.fromkeys(plain(plan, listing, r), r))
    bake_folder(source, d, tmp_path / "gain_ignored")
    monkeypatch.undo()  # the check plans with the bake's own (right) vectors
    check = check_folder(source, tmp_path / "gain_ignored", d)
    assert verdicts(check) == {"embedding": True, "attn_output": False, "mlp_down": False}, "\n".join(check.lines())


@pytest.mark.parametrize(
    ("mode", "alpha", "layer", "classes"),
    [
        ("affine", 1.0, 1, MATRICES | {"bias"}),  # removal + constant on a new ffn_down bias (mlp_bias switched on)
        ("scale", 0.5, 1, MATRICES),  # (1 + beta) times the component, its constant in the embedding
        ("add", 1.0, 0, {"embedding"}),  # only the constant, on every embedding row
    ],
)
def test_folder_modes_prescribe_their_component(mode, alpha, layer, classes, tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama", tied=True, num_layers=2)
    d = direction(tiny_models.HIDDEN_SIZE, mode=mode, alpha=alpha, layer=layer)
    out = tmp_path / "baked"
    bake_folder(source, d, out)
    plain = direction(tiny_models.HIDDEN_SIZE, layer=layer)  # the run's own mode: the output's manifest decides
    check = check_folder(source, out, plain)
    assert check.mode == mode and check.alpha == alpha
    assert_passes(check, classes)
    if mode == "affine":
        assert any(t.source_type == "(new)" and t.cls == "bias" for t in check.tensors)
    assert_every_class_fails(check_folder(source, source, d, embeddings="untie"), classes)
    if mode != "affine":  # (affine is ablate plus a constant the ablate plan does not look at)
        # without the manifest the run's mode (ablate) is prescribed, which this output does not carry
        bare = tmp_path / "bare"
        shutil.copytree(out, bare)
        (bare / "manifest.json").unlink()
        assert not check_folder(source, bare, plain).passed


# --------------------------------------------------------------------------------------------
# GGUF outputs


@pytest.fixture(scope="module")
def narrow_gguf(tiny_model_factory, tmp_path_factory):
    """A 64-wide llama (tied, with biases) as f32 / q8_0 / q4_0 / q4_1 GGUF files."""
    folder = tiny_model_factory("llama", tied=True, bias=True, num_layers=2)
    root = tmp_path_factory.mktemp("narrow_gguf")
    files = {"f32": root / "f32.gguf"}
    convert_folder(folder, files["f32"], "f32")
    for q in ("q8_0", "q4_0", "q4_1"):
        files[q] = root / f"{q}.gguf"
        quantize_file(files["f32"], files[q], q, threads=1)
    return folder, files


@pytest.mark.parametrize(
    ("source_type", "options", "stored"),
    [
        ("f32", {}, "F32"),
        ("f32", {"edited_type": "f16", "edited_type_always": True}, "F16"),
        ("q8_0", {}, "Q8_0"),
        ("q4_0", {}, "Q4_0"),
        ("q4_1", {}, "Q4_1"),
    ],
)
def test_gguf_right_edit_passes_unedited_fails(source_type, options, stored, narrow_gguf, tmp_path):
    """GGUF in, GGUF out (source types, or all edited tensors as f16), on a 64-wide model."""
    folder, files = narrow_gguf
    source = files[source_type]
    d = direction(tiny_models.HIDDEN_SIZE)
    run = run_dir(tmp_path, d)
    out = tmp_path / "baked.gguf"
    bake_to_gguf(str(source), run, out, **options)
    check = check_gguf(source, out, run)
    assert_passes(check, MATRICES | {"bias"})
    assert stored in {r.stored_type for r in check.rows if r.cls == "attn_output"}
    assert_every_class_fails(check_gguf(source, source, run), MATRICES | {"bias"})
    if source_type == "f32":
        wrong = check_gguf(source, out, run_dir(tmp_path, direction(tiny_models.HIDDEN_SIZE, seed=7), "wrong"))
        assert not wrong.passed and not any(verdicts(wrong)[c] for c in MATRICES)


@pytest.mark.parametrize("outtype", ["q8_0", "q4_1"])
def test_transformers_folder_to_gguf(outtype, narrow_gguf, tmp_path):
    """``--outtype``: the output is judged against the unrounded folder, through the converter's names."""
    folder, files = narrow_gguf
    run = run_dir(tmp_path, direction(tiny_models.HIDDEN_SIZE))
    out = tmp_path / "baked.gguf"
    bake_to_gguf(str(folder), run, out, outtype=outtype)
    check = weight_check(str(folder), out, run)
    assert check.format.startswith("gguf") and check.source == str(folder)
    assert_passes(check, MATRICES | {"bias"})
    assert_every_class_fails(check_gguf(folder, files["f32"], run), MATRICES | {"bias"})


def test_gguf_affine_constant_in_a_new_bias(narrow_gguf, tmp_path):
    folder, files = narrow_gguf
    run = run_dir(tmp_path, direction(tiny_models.HIDDEN_SIZE, mode="affine", alpha=1.0, layer=1))
    out = tmp_path / "baked.gguf"
    bake_to_gguf(str(files["f32"]), run, out)
    check = check_gguf(files["f32"], out, run)
    assert_passes(check, MATRICES | {"bias"})
    [carrier] = [t for t in check.tensors if t.name == "blk.0.ffn_down.bias"]  # the llama has mlp biases
    assert carrier.cls == "bias" and carrier.residual < 1e-6
    assert_every_class_fails(check_gguf(files["f32"], files["f32"], run), MATRICES | {"bias"})


def test_k_quants_and_four_bit_source_types(wide_factory, tmp_path):
    """256-wide model: Q4_K / Q6_K via transformers and as source types; 4-bit re-rounding loses the edit.

    Re-rounding a 4-bit source to its own type moves each weight by the edit (about |W| / sqrt(d))
    only when that beats half a quantization step; most weights round back to where they were, so
    much of the component stays (residual ~0.4 here, ~0.5 on SmolLM2): the check fails those
    tensors, and passes the same edit stored as q8_0 (``--edited-type-always``).
    """
    folder = wide_factory("llama", tied=True, bias=True, num_layers=2)
    run = run_dir(tmp_path, direction(256))
    hf = tmp_path / "hf-q4_k_m.gguf"
    bake_to_gguf(str(folder), run, hf, outtype="q4_k_m")
    check = check_gguf(folder, hf, run)
    assert_passes(check, MATRICES | {"bias"})
    assert {"Q4_K", "Q6_K"} <= {r.stored_type for r in check.rows}
    f32 = tmp_path / "f32.gguf"
    convert_folder(folder, f32, "f32")
    for qtype in ("q6_k", "q4_k_s"):
        source = tmp_path / f"{qtype}.gguf"
        quantize_file(f32, source, qtype, threads=1)
        out = tmp_path / f"{qtype}-baked.gguf"
        bake_to_gguf(str(source), run, out)
        check = check_gguf(source, out, run)
        assert_every_class_fails(check_gguf(source, source, run), MATRICES | {"bias"})
        if qtype == "q6_k":
            assert_passes(check, MATRICES | {"bias"})
            continue
        writers = [r for r in check.rows if r.cls in ("attn_output", "mlp_down") and r.stored_type == "Q4_K"]
        assert writers and not any(r.passed for r in writers), "\n".join(check.lines())
        assert "Q4_K -> Q4_K" in check.notes[0]
        assert all(0.2 < r.max_residual < 0.7 for r in writers), "\n".join(check.lines())  # part of the edit stays
        always = tmp_path / f"{qtype}-q8.gguf"
        bake_to_gguf(str(source), run, always, edited_type_always=True)
        assert_passes(check_gguf(source, always, run), MATRICES | {"bias"})


def test_mixture_of_experts(tiny_model_factory, tmp_path):
    """Qwen2-MoE: every expert's down projection and the shared expert's, on disk and as stacked GGUF tensors."""
    source = tiny_model_factory("qwen2_moe", tied=True, num_layers=2)
    d = direction(tiny_models.HIDDEN_SIZE)
    bake_folder(source, d, tmp_path / "baked")
    classes = {"embedding", "attn_output", "experts"}
    check = check_folder(source, tmp_path / "baked", d)
    assert_passes(check, classes)
    assert sum(t.cls == "experts" for t in check.tensors) == 2 * (tiny_models.NUM_EXPERTS + 1)
    assert_every_class_fails(check_folder(source, source, d), classes)
    run = run_dir(tmp_path, d)
    out = tmp_path / "baked.gguf"
    bake_to_gguf(str(source), run, out, outtype="q8_0")
    check = check_gguf(source, out, run)
    assert_passes(check, classes)
    stacked = next(t for t in check.tensors if t.name == "blk.0.ffn_down_exps.weight")
    assert stacked.units == tiny_models.NUM_EXPERTS  # judged expert by expert


def test_weight_check_dispatch(tiny_model_factory, tmp_path):
    """Folders and GGUF files are told apart; adapters have no baked weights to check."""
    source = tiny_model_factory("llama", tied=True, bias=True, num_layers=2)
    d = direction(tiny_models.HIDDEN_SIZE)
    bake_folder(source, d, tmp_path / "baked")
    run = run_dir(tmp_path, d)
    check = weight_check(str(source), tmp_path / "baked", run)
    assert check.format == "hf" and check.passed
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert weight_check(str(source), adapter, run) is None
