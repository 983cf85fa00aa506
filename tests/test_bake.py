"""Baking (spec section 6) and its check against the runtime hook (section 7), on tiny random models.

The guarantee under test: for every architecture, tied or not, with or without biases, the baked
checkpoint loaded with stock transformers gives the same logits (float32 error) as the original
model with the removal hook. Plus the file-level promises: same shard layout, source untouched,
atomic output, clear errors.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_models import ARCHS, HIDDEN_SIZE
from transformers import AutoModelForCausalLM, AutoTokenizer

import cosmic_bake.bake.folder as bake_module
from cosmic_bake.artifacts import SELECTION_FILE, Direction, model_hash, source_record
from cosmic_bake.bake.folder import bake_folder
from cosmic_bake.bake.plan import plan_bake
from cosmic_bake.cli.bake import bake_cmd
from cosmic_bake.cli.verify import verify_cmd
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export import safetensors_write
from cosmic_bake.export.safetensors_read import list_weights
from cosmic_bake.math.projections import project_out_cols, project_out_cols_, project_out_rows, project_out_rows_, unit
from cosmic_bake.model.architecture import probe
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.model.layout import model_layout
from cosmic_bake.model.loading import ModelSource
from cosmic_bake.outputs import sha256_file
from cosmic_bake.verify.logits import verify

PROMPTS = ["Write a short poem about the sea.", "How do I bake bread?", "What is the capital of France?"]
BIAS_ARCHS = ("llama", "gemma2", "gemma3_text")  # where the factory's bias flag changes the model
CASES = [
    pytest.param(arch, tied, bias, id=f"{arch}-{'tied' if tied else 'untied'}{'-bias' if bias else ''}")
    for arch in ARCHS
    for tied in (False, True)
    for bias in ((False, True) if arch in BIAS_ARCHS else (False,))
]


pytestmark = pytest.mark.usefixtures("one_thread")


def folder_hash(folder: Path) -> str:
    return model_hash(source_record(ModelSource(str(folder), "folder", path=folder)))


def random_direction(folder: Path | None, seed: int = 1, size: int = HIDDEN_SIZE, **kw) -> Direction:
    """A seeded random direction recorded as selected on ``folder`` (no hash when None)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(size, generator=g, dtype=torch.float64)
    return Direction(
        direction=r,
        reference=torch.zeros(size, dtype=torch.float64),
        layer=2,
        position=-1,
        model_id=str(folder or ""),
        model_hash=folder_hash(folder) if folder is not None else "",
        **kw,
    )


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def check_against_hook(source: Path, baked: Path, direction: Direction):
    original = load(source)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.padding_side = "left"
    return verify(original, probe(original), load(baked), direction, PROMPTS, ChatFormat(tokenizer), batch_size=3)


@pytest.mark.parametrize("arch,tied,bias", CASES)
def test_baked_model_matches_hook(tiny_model_factory, tmp_path, arch, tied, bias):
    source = tiny_model_factory(arch, tied=tied, bias=bias, num_layers=4)
    direction = random_direction(source)
    report = bake_folder(source, direction, tmp_path / "baked")
    assert report.untied == tied and not report.warnings
    assert report.edits["cols"] == 1 and report.edits["rows"] >= 8
    assert report.embeddings_edited == ["model.embed_tokens.weight"] and len(report.writers) >= 8
    config = json.loads((tmp_path / "baked" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    result = check_against_hook(source, tmp_path / "baked", direction)
    assert result.passed, result
    assert result.n_positions > len(PROMPTS) and result.max_kl <= 1e-6 and result.top1_agreement == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_projections_match_the_reference(dtype):
    """The in-place blockwise forms used for baking equal the plain formulas (several blocks)."""
    g = torch.Generator().manual_seed(0)
    r = unit(torch.randn(16, generator=g, dtype=torch.float64))
    w = torch.randn(16, 40, generator=g).to(dtype)
    e = torch.randn(50, 16, generator=g).to(dtype)
    expect_w = project_out_rows(w.double(), r).to(dtype)
    expect_e = project_out_cols(e.double(), r).to(dtype)
    assert torch.equal(project_out_rows_(w.clone(), r, block_elements=70), expect_w)
    assert torch.equal(project_out_cols_(e.clone(), r, block_elements=70), expect_e)
    exact = r / r.norm()  # unit() keeps the reference code's +1e-8, so its r_hat is not exactly unit
    baked = project_out_rows_(torch.randn(16, 40, dtype=torch.float64), exact, block_elements=70)
    assert float((exact @ baked).abs().max()) < 1e-12


def test_verify_catches_an_unbaked_model(tiny_model_factory):
    """The check has teeth: the original without the edit is far outside tolerance."""
    source = tiny_model_factory("llama", num_layers=4)
    result = check_against_hook(source, source, random_direction(source))
    assert not result.passed and result.max_kl > 1e-3


def test_post_norms_need_the_gain_corrected_direction(tiny_model_factory, tmp_path, monkeypatch):
    """Gemma's sandwich norms: orthogonalising against r instead of unit(g * r) fails verify."""
    source = tiny_model_factory("gemma2", num_layers=4)
    direction = random_direction(source)
    layout = model_layout(AutoModelForCausalLM.from_pretrained(str(source)).config)
    assert len(layout.post_norms) == 8 and layout.gain_offset == 1.0
    plain = bake_module.edit_vectors
    monkeypatch.setattr(bake_module, "edit_vectors", lambda plan, listing, r: dict.fromkeys(plain(plan, listing, r), r))
    bake_folder(source, direction, tmp_path / "baked")
    assert not check_against_hook(source, tmp_path / "baked", direction).passed


def test_plan_maps_on_disk_experts_to_fused_writers(tiny_model_factory):
    """Mixtral's per-expert w2 on disk are slices of the fused in-memory down_proj: rows edits."""
    source = tiny_model_factory("mixtral", num_layers=4)
    listing = list_weights(source)
    layout = model_layout(AutoModelForCausalLM.from_pretrained(str(source)).config)
    plan = plan_bake(layout, listing)
    edits = {e.name: e for e in plan.edits()}
    w2 = edits["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    assert (w2.kind, w2.vector, w2.writer) == ("rows", "r", "model.layers.1.mlp.experts")
    assert edits["model.layers.1.block_sparse_moe.experts.3.w1.weight"].kind == "copy"
    assert edits["model.embed_tokens.weight"].kind == "cols"


def test_sharded_source_keeps_layout_and_is_untouched(tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama", tied=True, num_layers=4, shard_size="200KB")
    before = {p.name: sha256_file(p) for p in source.iterdir() if p.is_file()}
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    assert len(shards) > 1
    direction = random_direction(source)
    out = tmp_path / "baked"
    report = bake_folder(source, direction, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards == report.files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source_index = json.loads((source / "model.safetensors.index.json").read_text())
    embed_file = source_index["weight_map"]["model.embed_tokens.weight"]
    assert index["weight_map"]["lm_head.weight"] == embed_file
    assert set(index["weight_map"]) == set(source_index["weight_map"]) | {"lm_head.weight"}
    tensors = {k: v for f in shards for k, v in load_file(str(out / f)).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    original_embed = load_file(str(source / embed_file))["model.embed_tokens.weight"]
    assert torch.equal(tensors["lm_head.weight"], original_embed)
    assert check_against_hook(source, out, direction).passed
    assert {p.name: sha256_file(p) for p in source.iterdir() if p.is_file()} == before


def test_tied_checkpoint_that_also_stores_the_head(tiny_model_factory, tmp_path):
    """A tied checkpoint with lm_head.weight on disk: the head keeps the original, the config is untied."""
    from safetensors.torch import save_file

    source = tmp_path / "source"
    shutil.copytree(tiny_model_factory("mistral", tied=True, num_layers=4), source)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    direction = random_direction(source)
    report = bake_folder(source, direction, tmp_path / "baked")
    assert report.untied
    assert json.loads((tmp_path / "baked" / "config.json").read_text())["tie_word_embeddings"] is False
    baked = load_file(str(tmp_path / "baked" / "model.safetensors"))
    assert torch.equal(baked["lm_head.weight"], tensors["lm_head.weight"])
    assert check_against_hook(source, tmp_path / "baked", direction).passed


def test_resharding_with_max_shard_size(tiny_model_factory, tmp_path):
    source = tiny_model_factory("qwen2", num_layers=4)
    direction = random_direction(source)
    report = bake_folder(source, direction, tmp_path / "baked", max_shard_size="150KB")
    assert len(report.files) > 1 and (tmp_path / "baked" / "model.safetensors.index.json").is_file()
    assert check_against_hook(source, tmp_path / "baked", direction).passed


def test_embeddings_skip_leaves_tied_embedding_and_warns(tiny_model_factory, tmp_path):
    source = tiny_model_factory("qwen2", tied=True, num_layers=4)
    direction = random_direction(source)
    report = bake_folder(source, direction, tmp_path / "baked", embeddings="skip")
    assert report.warnings and "differs from the runtime hook" in report.warnings[0]
    assert not report.untied and "cols" not in report.edits
    baked = load_file(str(tmp_path / "baked" / "model.safetensors"))
    original = load_file(str(source / "model.safetensors"))
    assert torch.equal(baked["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert "lm_head.weight" not in baked
    assert json.loads((tmp_path / "baked" / "config.json").read_text())["tie_word_embeddings"] is True
    assert not torch.equal(
        baked["model.layers.0.self_attn.o_proj.weight"], original["model.layers.0.self_attn.o_proj.weight"]
    )


def test_manifest_card_and_side_files(tiny_model_factory, tmp_path):
    source = tiny_model_factory("phi3", tied=True, num_layers=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    direction = random_direction(source)
    direction.save(run_dir)
    (run_dir / SELECTION_FILE).write_text(json.dumps({"chosen_scores": {"first": 0.5, "kl": 0.01}}))
    out = tmp_path / "baked"
    bake_folder(source, run_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "bake" and manifest["scores"] == {"first": 0.5, "kl": 0.01}
    assert manifest["direction"]["sha256_float64"] == direction.digest
    assert manifest["direction"]["layer"] == 2 and manifest["bake"]["untied"] is True
    assert manifest["source_model"]["files"]["model.safetensors"] == sha256_file(source / "model.safetensors")
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- cosmic-bake" in card and "library_name: transformers" in card
    assert direction.digest in card
    assert not list(tmp_path.glob(".baked.partial-*"))


def test_wrong_direction_size(tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama", num_layers=4)
    with pytest.raises(CosmicBakeError, match="hidden size is 64"):
        bake_folder(source, random_direction(source, size=32), tmp_path / "baked")
    assert not (tmp_path / "baked").exists()


def test_direction_from_another_model(tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama", num_layers=4)
    other = random_direction(tiny_model_factory("mistral", num_layers=4))
    with pytest.raises(CosmicBakeError, match="selected on another model"):
        bake_folder(source, other, tmp_path / "baked")
    assert bake_folder(source, other, tmp_path / "baked", allow_mismatch=True).files == ["model.safetensors"]


def test_unknown_mode_is_refused(tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama", num_layers=4)
    with pytest.raises(CosmicBakeError, match="cannot bake mode 'rotate'"):
        bake_folder(source, random_direction(source, mode="rotate"), tmp_path / "baked")
    assert not (tmp_path / "baked").exists()


def test_output_inside_source_and_existing_output(tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama", num_layers=4)
    direction = random_direction(source)
    with pytest.raises(CosmicBakeError, match="is inside the input"):
        bake_folder(source, direction, source / "baked")
    assert not (source / "baked").exists()
    out = tmp_path / "baked"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CosmicBakeError, match="already exists"):
        bake_folder(source, direction, out)
    assert (out / "keep.txt").exists()
    with pytest.raises(CosmicBakeError, match="not a cosmic-bake output"):  # force replaces only the tool's own
        bake_folder(source, direction, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    bake_folder(source, direction, out, force=True)  # an empty folder
    bake_folder(source, direction, out, force=True)  # an earlier bake
    assert (out / "model.safetensors").is_file()


def test_disk_full_mid_write_leaves_nothing(tiny_model_factory, tmp_path, monkeypatch):
    source = tiny_model_factory("llama", tied=True, num_layers=4, shard_size="200KB")
    real_save = safetensors_write.write_safetensors
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors_write, "write_safetensors", failing_save)
    with pytest.raises(CosmicBakeError, match="no space left"):
        bake_folder(source, random_direction(source), tmp_path / "baked")
    assert len(calls) == 2
    assert not (tmp_path / "baked").exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_bake_then_verify(tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama", tied=True, num_layers=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    random_direction(source).save(run_dir)
    runner = CliRunner()
    res = runner.invoke(bake_cmd, [str(source), "--direction", str(run_dir), "-o", str(tmp_path / "baked")])
    assert res.exit_code == 0, res.output
    assert "untied" in res.output
    report = tmp_path / "verify.json"
    args = [str(source), str(tmp_path / "baked"), "--direction", str(run_dir), "--limit", "2", "-o", str(report)]
    res = runner.invoke(verify_cmd, args)
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and json.loads(report.read_text())["passed"] is True
    res = runner.invoke(
        bake_cmd,
        [str(source), "--direction", str(run_dir), "-o", str(tmp_path / "skip"), "--embeddings", "skip"],
    )
    assert res.exit_code == 0 and "warning" in res.output
    res = runner.invoke(verify_cmd, [str(source), str(tmp_path / "skip"), "--direction", str(run_dir), "--limit", "2"])
    assert res.exit_code == 1 and "FAIL" in res.output


def test_cli_gguf_format_needs_a_gguf_file_name(tiny_model_factory, tmp_path):
    source = tiny_model_factory("llama", num_layers=4)
    res = CliRunner().invoke(
        bake_cmd, [str(source), "--direction", str(tmp_path / "run"), "--format", "gguf", "-o", str(tmp_path / "x")]
    )
    assert isinstance(res.exception, CosmicBakeError) and "does not end in .gguf" in str(res.exception)
    assert not (tmp_path / "x").exists()


def test_kill_mid_write_leaves_no_complete_looking_output(tiny_model_factory, tmp_path):
    """A process killed (SIGKILL) while writing shards leaves only a hidden '.partial' folder."""
    import subprocess
    import sys

    source = tiny_model_factory("llama", tied=True, num_layers=4, shard_size="200KB")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    random_direction(source).save(run_dir)
    out = tmp_path / "baked"
    code = (
        "import os, signal, sys\n"
        "from cosmic_bake.export import safetensors_write\n"
        "from cosmic_bake.bake.folder import bake_folder\n"
        "real = safetensors_write.write_safetensors\n"
        "calls = []\n"
        "def dying(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 1:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "safetensors_write.write_safetensors = dying\n"
        "bake_folder(sys.argv[1], sys.argv[2], sys.argv[3])\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(source), str(run_dir), str(out)], timeout=300)
    assert done.returncode == -9
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("run",)]
    assert all(p.name.startswith(".baked.partial-") for p in leftovers)
    assert all(not (p / "manifest.json").exists() for p in leftovers)
    # and a new bake to the same path just works
    bake_folder(source, run_dir, out)
    assert (out / "manifest.json").is_file()
