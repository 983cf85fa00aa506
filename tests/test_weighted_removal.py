"""Weighted removal (per-layer strengths) and projected directions: baked weights equal their hook.

A weighted removal keeps ``1 - s`` of the component along the direction at each writer (``s`` per
block, and one for the embedding). It is baked in hf folders, GGUF files (from a folder and from a
GGUF source) and LoRA adapters, and ``verify`` (logits and weight-space check) must prove each
equal to the hook with the same strengths, and tell it from full-strength removal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cosmic_bake import api
from cosmic_bake.artifacts import Direction
from cosmic_bake.export.gguf_convert import convert_folder
from cosmic_bake.math.directions import project_off

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(folder: Path, tmp: Path, name: str = "run", seed: int = 5, full: bool = False) -> Path:
    """A run folder with a random direction and random strengths in [0, 1.5] (all 1 with ``full``)."""
    config = json.loads((folder / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    d_model, n_layers = config["hidden_size"], config["num_hidden_layers"]
    strengths = None if full else 1.5 * torch.rand(n_layers + 1, generator=g, dtype=torch.float64)
    d = Direction(
        direction=2.0 * torch.randn(d_model, generator=g, dtype=torch.float64),
        reference=torch.randn(d_model, generator=g, dtype=torch.float64),
        layer=1,
        position=-1,
        model_id="tiny",
        strengths=strengths,
    )
    run = tmp / name
    run.mkdir()
    d.save(run)
    return run


def test_strengths_survive_the_artifact_and_set_each_tensor_coefficient(tmp_path, tiny_model_factory):
    folder = tiny_model_factory("llama")
    d = Direction.load(_run(folder, tmp_path))
    assert d.strengths is not None and d.strengths.shape == (d.hook().strengths.numel(),)
    assert d.coeff(None) == float(d.strengths[0]) and d.coeff(2) == float(d.strengths[3])
    assert len(d.record()["strengths"]) == d.strengths.numel()
    assert Direction.load(_run(folder, tmp_path, "full", full=True)).coeff(2) == 1.0


@pytest.mark.parametrize(
    ("arch", "tied"),
    [
        ("llama", False),
        ("llama", True),
        ("qwen2", False),
        ("mistral", False),
        ("gemma2", True),
        ("gemma3_text", True),
        ("phi3", False),
        ("mixtral", False),
        ("qwen2_moe", False),
    ],
)
def test_weighted_removal_baked_equals_its_hook(arch, tied, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch, tied=tied, bias=arch == "qwen2")
    run = _run(folder, tmp_path)
    out = tmp_path / "baked"
    api.bake(str(folder), run, out)
    report = api.verify(str(folder), out, run, limit=2)
    assert report.passed and report.max_kl <= 1e-6, report.to_dict()
    # the check tells the weighted bake from full-strength removal (same direction, strengths 1)
    full = Direction.load(run)
    full.strengths = None
    full_run = tmp_path / "full"
    full_run.mkdir()
    full.save(full_run)
    wrong = api.verify(str(folder), out, full_run, limit=2)
    assert not wrong.passed


@pytest.mark.llama
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weighted_removal_in_gguf_equals_its_hook(arch, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch, bias=arch == "qwen2")
    run = _run(folder, tmp_path)
    from_folder = tmp_path / "from_folder.gguf"
    api.bake(str(folder), run, from_folder, format="gguf", outtype="f32")
    report = api.verify(str(folder), from_folder, run, limit=2)
    assert report.runtime == "llama.cpp" and report.passed and report.mean_kl <= 1e-6, report.to_dict()
    base = tmp_path / "base.gguf"
    convert_folder(folder, base, "f32")
    from_gguf = tmp_path / "from_gguf.gguf"
    api.bake(str(base), run, from_gguf, format="gguf", allow_mismatch=True)
    report = api.verify(str(base), from_gguf, run, limit=2)
    assert report.passed and report.mean_kl <= 1e-6 and report.weights["passed"], report.to_dict()


def test_weighted_removal_as_lora_equals_its_hook(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    run = _run(folder, tmp_path)
    out = tmp_path / "lora"
    api.export_lora(str(folder), run, out, gguf=False)
    report = api.verify(str(folder), out, run, limit=2)
    assert report.passed and report.max_kl <= 1e-6, report.to_dict()


def test_projected_direction_is_orthogonal_to_the_harmless_mean():
    g = torch.Generator().manual_seed(0)
    r, mu = torch.randn(3, 4, 16, generator=g, dtype=torch.float64), torch.randn(3, 4, 16, generator=g)
    p = project_off(r, mu)
    assert float((p * mu.double()).sum(-1).abs().max()) < 1e-9
    # what is left is the part of r orthogonal to mu: r - p is parallel to mu
    resid = r - p
    cos = (resid * mu.double()).sum(-1).abs() / (resid.norm(dim=-1) * mu.double().norm(dim=-1))
    assert float((cos - 1).abs().max()) < 1e-9
    assert torch.equal(project_off(r, torch.zeros(16)), r)


def test_select_with_projected_candidates(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("qwen2", bias=True)
    out = tmp_path / "sel"
    api.select(str(folder), out, direction_method="projected", limit=8, limit_val=4)
    d = Direction.load(out)
    sel = json.loads((out / "selection.json").read_text())
    assert sel["direction_method"] == "projected" and d.extra["direction_method"] == "projected"
    # the chosen candidate is orthogonal to the harmless mean it was projected against
    cos = float(d.direction @ d.reference) / float(d.direction.norm() * d.reference.norm())
    assert abs(cos) < 1e-9


def test_tent_kernel():
    from cosmic_bake.math.kernels import tent

    s = tent(6, peak=2.0, width=2.0, max_weight=1.2, min_weight=0.2)
    # index 0 is the embedding (layer -1), index l + 1 is layer l
    assert s.shape == (7,)
    assert float(s[3]) == pytest.approx(1.2) and float(s[1]) == pytest.approx(0.2) and float(s[5]) == pytest.approx(0.2)
    assert float(s[2]) == pytest.approx(0.7) and float(s[0]) == 0.0 and float(s[6]) == 0.0
    assert torch.equal(tent(6, 2.5, 6.0, 1.0, 1.0), torch.ones(7, dtype=torch.float64))


def test_select_searches_a_weighted_removal_from_activations(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("qwen2", bias=True)
    out = tmp_path / "sel"
    api.select(str(folder), out, limit=8, limit_val=4, search_trials=6, search_kl=10.0, search_candidates=3)
    sel = json.loads((out / "selection.json").read_text())
    res = sel["edit_search"]
    assert len(res["trials"]) == 6 and (out / "search.png").is_file()
    # trial 0 is full removal of COSMIC's choice; its KL equals what eval's hook gives for that edit
    first = res["trials"][0]
    assert (first["position"], first["layer"]) == (sel["chosen"]["position"], sel["chosen"]["layer"])
    assert first["max_weight"] == first["min_weight"] == 1.0
    d = Direction.load(out)
    chosen = res["chosen"]
    assert (d.position, d.layer) == (chosen["position"], chosen["layer"])
    assert d.strengths is not None and [round(float(x), 6) for x in d.strengths] == res["strengths"]
    # the chosen trial leaves the least separation within the KL target
    assert abs(chosen["gap"]) == min(abs(t["gap"]) for t in res["trials"] if t["kl"] <= 10.0)
    # what it writes bakes and verifies like any removal
    baked = tmp_path / "baked"
    api.bake(str(folder), out, baked)
    assert api.verify(str(folder), baked, out, limit=2).passed


def test_refusal_gap_falls_with_the_strength_of_a_removal():
    from cosmic_bake.math.scores import refusal_gap

    g = torch.Generator().manual_seed(1)
    harmless = torch.randn(20, 2, 16, generator=g, dtype=torch.float64)
    shift = torch.randn(2, 16, generator=g, dtype=torch.float64)
    harmful = torch.randn(20, 2, 16, generator=g, dtype=torch.float64) + 3 * shift
    assert refusal_gap(harmful, harmful, harmless) == pytest.approx(1.0)
    gap = harmful.mean(0) - harmless.mean(0)
    unit = gap / gap.norm(dim=-1, keepdim=True)
    lefts = []
    for s in (0.0, 0.25, 0.5, 0.75, 1.0):  # remove s of each prompt's excess along the gap
        edited = harmful - s * ((harmful - harmless.mean(0)) * unit).sum(-1, keepdim=True) * unit
        lefts.append(refusal_gap(edited, harmful, harmless))
    assert lefts == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-6)  # UNIT_EPS in the norms


def test_selection_and_search_read_no_generated_text(tiny_model_factory, tmp_path, monkeypatch):
    """Candidates, scores, the choice and the edit search run on activations only: generation is never called."""
    import cosmic_bake.verify.evaluate as evaluate

    def no_generation(*_a, **_k):
        raise AssertionError("selection generated text")

    monkeypatch.setattr(evaluate, "generate", no_generation)
    monkeypatch.setattr("transformers.GenerationMixin.generate", no_generation)
    folder = tiny_model_factory("llama")
    api.select(str(folder), tmp_path / "sel", limit=8, limit_val=4, search_trials=3, search_kl=10.0)
    # the guard works: the alpha sweep reads completions, and so trips it
    with pytest.raises(AssertionError, match="generated text"):
        api.select(str(folder), tmp_path / "sweep", limit=8, limit_val=4, mode="affine", alphas=(1.0,))
