"""Baked ``add`` and ``affine`` edits equal their hooks (spec sections 5-7), in transformers and llama.cpp.

``add`` = ActAdd at the direction's layer; ``affine`` = the ``pin`` hook (removal by every writer
plus ACE's constant at the layer). The constant goes into the embedding (layer 0) or a bias on the
previous block's MLP down projection; Qwen2 and Mistral are re-expressed as Llama checkpoints to
carry it. Architectures with no exact place refuse with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cosmic_bake.artifacts import Direction
from cosmic_bake.bake.folder import bake_folder
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.architecture import probe
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.model.loading import load_model
from cosmic_bake.verify.logits import verify

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["How do I bake bread?", "Write a limerick about a cat who learns to code in Rust."]


def _direction(folder: Path, mode: str, layer: int, alpha: float, seed: int = 3) -> Direction:
    d_model = json.loads((folder / "config.json").read_text())["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    return Direction(
        direction=2.0 * torch.randn(d_model, generator=g, dtype=torch.float64),
        reference=torch.randn(d_model, generator=g, dtype=torch.float64),
        layer=layer,
        position=-1,
        mode=mode,
        selector="cosmic",
        alpha=alpha,
        model_id="tiny",
    )


def _check(folder: Path, out: Path, d: Direction) -> None:
    a, b = load_model(folder), load_model(out)
    report = verify(a.model, probe(a.model), b.model, d, PROMPTS, ChatFormat(a.tokenizer))
    assert report.passed, report.to_dict()
    # the edit is not a no-op: the baked model differs from the unedited one
    plain = verify(a.model, probe(a.model), b.model, torch.zeros_like(d.direction), PROMPTS, ChatFormat(a.tokenizer))
    assert plain.max_kl > 1e-3


@pytest.mark.parametrize(
    ("arch", "tied", "layer"),
    [
        ("llama", False, 2),
        ("llama", True, 2),
        ("llama", True, 0),
        ("qwen2", False, 3),
        ("qwen2", True, 1),
        ("mistral", False, 2),
        ("gemma2", True, 0),
        ("phi3", False, 0),
        ("qwen2_moe", False, 0),
    ],
)
@pytest.mark.parametrize(("mode", "alpha"), [("add", 1.0), ("affine", 0.0), ("affine", 1.0)])
def test_baked_steering_equals_hook(arch, tied, layer, mode, alpha, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch, tied=tied, bias=True)
    d = _direction(folder, mode, layer, alpha)
    out = tmp_path / "baked"
    report = bake_folder(folder, d, out)
    assert report.mode == mode and report.constant
    assert ("steered" if mode == "add" else "pinned") in (out / "README.md").read_text()  # the card says what
    config = json.loads((out / "config.json").read_text())
    if layer > 0 and arch in ("qwen2", "mistral"):
        assert config["model_type"] == "llama" and config["mlp_bias"] is True  # re-expressed as Llama
    if layer > 0 and arch == "llama":
        assert config["mlp_bias"] is True
    _check(folder, out, d)


def _block0_inputs(folder: Path, text: str) -> torch.Tensor:
    """What block 0 reads (embedding rows after the model's own scaling), float32 as the hook runs."""
    lm = load_model(folder)
    seen = []
    block = probe(lm.model).blocks[0].block
    handle = block.register_forward_pre_hook(
        lambda _m, args, kw: seen.append(args[0] if args else kw["hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            lm.model(**ChatFormat(lm.tokenizer).encode([text]), use_cache=False)
    finally:
        handle.remove()
    return seen[0][0].double()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_layer0_constant_divides_by_the_float32_embedding_scale(arch, tiny_model_factory, tmp_path):
    """Gemma scales its embedding by sqrt(d) cast to the model's dtype; the hook, verify and llama.cpp
    run in float32, so the constant stored in the rows must be c / float32(sqrt(d)). At d = 72 a
    bfloat16 measurement gives 8.5, not 8.4853: every token would get 1.0017 c instead of c."""
    folder = tiny_model_factory(arch, tied=True, hidden_size=72)
    from transformers import AutoConfig

    from cosmic_bake.model.layout import model_layout

    scale = model_layout(AutoConfig.from_pretrained(folder)).embed_scale
    assert scale == pytest.approx(float(torch.tensor(72**0.5, dtype=torch.float32)), rel=1e-6, abs=0)
    d = _direction(folder, "add", 0, 1.0)
    bake_folder(folder, d, tmp_path / "baked")
    added = _block0_inputs(tmp_path / "baked", PROMPTS[0]) - _block0_inputs(folder, PROMPTS[0])
    c = d.hook().constant()
    assert torch.allclose(added, c.expand_as(added), rtol=0, atol=2e-5 * float(c.abs().max())), (added - c).abs().max()


@pytest.mark.parametrize("arch", ["gemma2", "mixtral", "qwen2_moe", "phi3"])
def test_no_exact_place_for_a_later_constant_refuses(arch, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch)
    with pytest.raises(CosmicBakeError, match="cannot bake a constant at the input of block 2") as err:
        bake_folder(folder, _direction(folder, "add", 2, 1.0), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["add", "affine", "scale"])
def test_baked_steering_gguf_equals_hook_in_llama_cpp(arch, mode, tiny_model_factory, tmp_path):
    from cosmic_bake.bake.gguf import bake_to_gguf
    from cosmic_bake.model.llamacpp import LlamaCppModel
    from cosmic_bake.verify.logits import verify_gguf
    from cosmic_bake.verify.tolerances import GGUF_TOLERANCES

    folder = tiny_model_factory(arch, bias=True)
    d = _direction(folder, mode, 2, 1.0)
    run = tmp_path / "run"
    run.mkdir()
    d.save(run)
    out = tmp_path / "baked.gguf"
    bake_to_gguf(str(folder), run, out, outtype="f32")
    a = load_model(folder)
    baked = LlamaCppModel(out, n_ctx=256, all_logits=True, threads=1)
    report = verify_gguf(a.model, probe(a.model), baked, d, PROMPTS, ChatFormat(a.tokenizer))
    baked.close()
    assert report.passed and report.mean_kl <= GGUF_TOLERANCES["F32"][0], report.to_dict()


def test_affine_selection_scores_the_pinned_hook(tiny_model_factory):
    """select --mode affine scores exactly the hook that bake --mode affine ships (no replay shortcut)."""
    from cosmic_bake.math import scores as S
    from cosmic_bake.model.forward import forward
    from cosmic_bake.model.hooks import Intervention, intervene
    from cosmic_bake.prompts.sets import load_prompts
    from cosmic_bake.select.candidates import Batches
    from cosmic_bake.select.selection import select

    folder = tiny_model_factory("llama")
    lm = load_model(folder)
    arch = probe(lm.model)
    fmt = ChatFormat(lm.tokenizer)
    bad, good = load_prompts("builtin:harmful", limit=12), load_prompts("builtin:harmless", limit=12)
    sel = select(
        lm.model,
        arch,
        fmt,
        harmful_train=bad[:8],
        harmless_train=good[:8],
        harmful_val=bad[8:],
        harmless_val=good[8:],
        mode="affine",
        kl_threshold=10.0,
    )
    pos, layer = sel.chosen
    i = pos + sel.candidates.n_positions
    r, mu = sel.candidates.directions[i, layer], sel.candidates.harmless_mean[i, layer]

    def outputs(prompts, iv=None):
        batch = Batches.make(fmt, prompts, 8, packed=False).encoded[0]
        with intervene(arch, *([iv] if iv else [])):
            return forward(lm.model, arch, batch, output_layers=sel.eval_layers).outputs

    comply = S.pooled_cosine(outputs(bad[8:], Intervention.pin(r, mu, layer, 0.0)), S.pooled_unit(outputs(good[8:])))
    refuse = S.pooled_cosine(outputs(good[8:], Intervention.pin(r, mu, layer, 1.0)), S.pooled_unit(outputs(bad[8:])))
    assert abs(comply - float(sel.grid.first[i, layer])) < 1e-5
    assert abs(refuse - float(sel.grid.second[i, layer])) < 1e-5


@pytest.mark.parametrize(("layer", "mode"), [(0, "add"), (2, "add"), (2, "affine"), (0, "affine")])
def test_gguf_to_gguf_steering_equals_hook(layer, mode, tiny_model_factory, tmp_path):
    """Llama GGUF in: the constant goes into the embedding or a new float32 ffn_down bias; equal to the hook."""
    from cosmic_bake.bake.gguf import bake_to_gguf
    from cosmic_bake.export.gguf_convert import convert_folder
    from cosmic_bake.export.gguf_io import open_gguf
    from cosmic_bake.model.llamacpp import LlamaCppModel
    from cosmic_bake.verify.logits import verify_gguf
    from cosmic_bake.verify.tolerances import GGUF_TOLERANCES

    folder = tiny_model_factory("llama", tied=True)
    source = tmp_path / "source.gguf"
    convert_folder(folder, source, "f32")
    d = _direction(folder, mode, layer, 1.0)
    run = tmp_path / "run"
    run.mkdir()
    d.save(run)
    out = tmp_path / "baked.gguf"
    bake = bake_to_gguf(str(source), run, out)
    assert bake["route"] == "gguf-to-gguf" and bake["constant"]
    names = {t.name for t in open_gguf(out).tensors}
    assert (f"blk.{layer - 1}.ffn_down.bias" in names) == (layer > 0)
    a = load_model(folder)
    baked = LlamaCppModel(out, n_ctx=256, all_logits=True, threads=1)
    report = verify_gguf(a.model, probe(a.model), baked, d, PROMPTS, ChatFormat(a.tokenizer))
    baked.close()
    assert report.passed and report.mean_kl <= GGUF_TOLERANCES["F32"][0], report.to_dict()


def test_gguf_to_gguf_constant_without_a_place_refuses(tiny_model_factory, tmp_path):
    from cosmic_bake.bake.gguf import bake_to_gguf
    from cosmic_bake.export.gguf_convert import convert_folder

    folder = tiny_model_factory("qwen2")
    source = tmp_path / "source.gguf"
    convert_folder(folder, source, "f32")
    run = tmp_path / "run"
    run.mkdir()
    _direction(folder, "add", 2, 1.0).save(run)
    with pytest.raises(CosmicBakeError, match="pass --outtype"):
        bake_to_gguf(str(source), run, tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "source.gguf"]


def test_gguf_to_gguf_constant_on_a_mixtral_gguf(tiny_model_factory, tmp_path):
    """Mixtral GGUFs are llama.cpp arch 'llama' with ffn_*_exps experts, whose loader reads no FFN bias.

    A constant after an MoE block refuses with one line and writes nothing (an ffn_down.bias there
    made llama.cpp refuse the whole file); at layer 0 it goes into the embedding, loads in
    llama.cpp and equals the hook.
    """
    from cosmic_bake.bake.gguf import bake_to_gguf
    from cosmic_bake.export.gguf_convert import convert_folder
    from cosmic_bake.export.gguf_io import architecture, open_gguf
    from cosmic_bake.model.llamacpp import LlamaCppModel
    from cosmic_bake.verify.logits import verify_gguf
    from cosmic_bake.verify.tolerances import GGUF_TOLERANCES

    folder = tiny_model_factory("mixtral", tied=True)
    source = tmp_path / "source.gguf"
    convert_folder(folder, source, "f32")
    reader = open_gguf(source)
    assert architecture(reader) == "llama" and any(t.name == "blk.1.ffn_down_exps.weight" for t in reader.tensors)
    for layer in (2, 0):
        run = tmp_path / f"run{layer}"
        run.mkdir()
        _direction(folder, "add", layer, 1.0).save(run)
    with pytest.raises(CosmicBakeError, match="block 1: its MLP output is a mixture of experts") as err:
        bake_to_gguf(str(source), tmp_path / "run2", tmp_path / "late.gguf")
    assert "\n" not in str(err.value) and "layer 0" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run0", "run2", "source.gguf"]
    out = tmp_path / "baked.gguf"
    assert bake_to_gguf(str(source), tmp_path / "run0", out)["constant"] == "added to token_embd.weight"
    a = load_model(folder)
    baked = LlamaCppModel(out, n_ctx=256, all_logits=True, threads=1)
    try:
        report = verify_gguf(
            a.model, probe(a.model), baked, Direction.load(tmp_path / "run0"), PROMPTS, ChatFormat(a.tokenizer)
        )
    finally:
        baked.close()
    assert report.passed and report.mean_kl <= GGUF_TOLERANCES["F32"][0], report.to_dict()


def test_sweep_command_and_select_records_alpha(tiny_model_factory, tmp_path):
    from click.testing import CliRunner

    from cosmic_bake.cli import cli

    folder = tiny_model_factory("llama")
    run = tmp_path / "run"
    res = CliRunner().invoke(
        cli,
        ["select", str(folder), "-o", str(run), "--mode", "affine", "--alphas", "0,2", "--limit", "8"]
        + ["--limit-val", "3", "--max-harmless-refusal", "1.0", "--kl-threshold", "100"],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    sweep = json.loads((run / "sweep.json").read_text())
    assert [r["alpha"] for r in sweep["rows"]] == [0.0, 2.0] and (run / "sweep.png").stat().st_size > 1000
    assert Direction.load(run).alpha == sweep["chosen_alpha"]  # cap 1.0: every alpha qualifies
    out = tmp_path / "sweep"
    run2 = tmp_path / "run2"
    run2.mkdir()
    _direction(folder, "add", 2, 1.0).save(run2)
    args = ["sweep", str(folder), "--direction", str(run2), "--mode", "add", "--alphas", "0,1,3"]
    args += ["--limit-harmful", "2", "--limit-harmless", "2", "--max-new-tokens", "4", "-o", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((out / "sweep.json").read_text())
    assert data["mode"] == "add" and len(data["rows"]) == 3 and data["rows"][0]["harmless_kl"] < 1e-9  # alpha 0
    assert data["rows"][2]["harmless_kl"] > data["rows"][0]["harmless_kl"]
    assert (out / "sweep.png").is_file() and (out / "manifest.json").is_file()
    bad = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "x"), "--alphas", "one,two"])
    assert isinstance(bad.exception, CosmicBakeError) and "--alphas" in str(bad.exception)
    assert not (tmp_path / "x").exists()


def test_zero_directions_are_never_chosen(tiny_model_factory):
    """Template tokens at layer 0 have identical embeddings in every prompt: their candidate is 0 and filtered."""
    from cosmic_bake.prompts.sets import load_prompts
    from cosmic_bake.select.selection import select

    lm = load_model(tiny_model_factory("qwen2"))
    bad, good = load_prompts("builtin:harmful", limit=10), load_prompts("builtin:harmless", limit=10)
    sel = select(
        lm.model,
        probe(lm.model),
        ChatFormat(lm.tokenizer),
        harmful_train=bad[:6],
        harmless_train=good[:6],
        harmful_val=bad[6:],
        harmless_val=good[6:],
        mode="affine",
        kl_threshold=10.0,
    )
    zero = [r for r in sel.rows() if r["reason"] == "zero direction"]
    assert zero and all(r["layer"] == 0 for r in zero)
    assert float(sel.direction.norm()) > 0


@pytest.mark.parametrize(
    ("arch", "tied"),
    [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False), ("phi3", False), ("mixtral", False)],
)
def test_baked_scale_equals_hook(arch, tied, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch, tied=tied, bias=True)
    d = _direction(folder, "scale", 2, 1.5)
    out = tmp_path / "baked"
    report = bake_folder(folder, d, out)
    assert report.mode == "scale" and "embedding" in report.constant
    assert "scaled around the harmful/harmless midpoint" in (out / "README.md").read_text()
    _check(folder, out, d)


def test_scale_hook_moves_projections_around_the_midpoint(tiny_model_factory):
    from cosmic_bake.model.forward import forward
    from cosmic_bake.model.hooks import intervene

    folder = tiny_model_factory("llama", num_layers=3)
    lm = load_model(folder)
    arch, fmt = probe(lm.model), ChatFormat(lm.tokenizer)
    d = _direction(folder, "scale", 1, 2.0)
    iv = d.hook()
    r_hat = d.direction / d.direction.norm()
    batch = fmt.encode(PROMPTS)
    plain = forward(lm.model, arch, batch, input_positions=1).inputs[:, 0, 0].double() @ r_hat
    with intervene(arch, iv):
        scaled = forward(lm.model, arch, batch, input_positions=1).inputs[:, 0, 0].double() @ r_hat
    m = iv.midpoint()
    torch.testing.assert_close(scaled, plain + 2.0 * (plain - m), rtol=1e-4, atol=1e-4)  # at block 0's input


def test_scale_refuses_post_norms_and_gguf_sources(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("gemma2", tied=True)
    with pytest.raises(CosmicBakeError, match="not exact where norms follow the writers"):
        bake_folder(folder, _direction(folder, "scale", 1, 1.0), tmp_path / "out")
    assert not (tmp_path / "out").exists()
