"""Direction methods (mean, PCA), --eval-layers and the ``compare`` command."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cosmic_bake.cli import cli
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.math.directions import pca_direction
from cosmic_bake.math.scores import resolve_eval_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _known_direction_data(n: int = 200, d: int = 32, seed: int = 0):
    """Pairs whose differences vary along ``v`` only, plus a constant offset ``w`` orthogonal to it.

    The mean difference is ``mean(a) v + w`` (tilted by ``w``); the first principal component of
    the differences is ``v`` itself.
    """
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    w = 3.0 * torch.nn.functional.normalize(w - (w @ v) * v, dim=0)
    a = 2.0 + torch.randn(n, generator=g, dtype=torch.float64)  # mostly positive, mean 2
    harmless = torch.randn(n, d, generator=g, dtype=torch.float64)
    harmful = harmless + a[:, None] * v + w + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return harmful, harmless, v, w, a


def test_pca_recovers_the_known_direction_where_the_mean_is_tilted():
    harmful, harmless, v, w, a = _known_direction_data()
    r = pca_direction(harmful, harmless)
    mean = (harmful - harmless).mean(0)
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    assert cos(r, v) > 0.9999  # sign aligned with the mean difference
    assert cos(mean, v) < 0.7  # the mean is pulled toward w
    torch.testing.assert_close(r.norm(), mean @ v, rtol=1e-4, atol=1e-4)  # scaled by m . u


def test_pca_sign_follows_the_mean_and_leading_shape_is_kept():
    harmful, harmless, v, _, _ = _known_direction_data(n=64, d=16)
    stacked = torch.stack([harmful, harmless, harmful], dim=1)  # [n, 3, d] (like [n, P, d])
    other = torch.stack([harmless, harmful, harmless], dim=1)
    r = pca_direction(stacked, other)
    assert r.shape == (3, 16)
    assert float(r[0] @ v) > 0 and float(r[1] @ v) < 0  # the reversed pair points the other way
    torch.testing.assert_close(r[0], r[2])
    zero = pca_direction(harmless[:, None], harmless[:, None])  # identical sets: no direction
    assert float(zero.abs().max()) == 0.0


def test_eval_layers_resolution():
    sims = torch.tensor([0.9, 0.5, 0.7, 0.1, 0.8, 0.3, 0.95, 0.6, 0.99, 0.4])
    assert resolve_eval_layers(None, sims) == [3]  # the paper's 10%
    assert resolve_eval_layers(0.3, sims) == [3, 5, 9]
    assert resolve_eval_layers([7, 2, 2], sims) == [2, 7]
    for bad in (1.5, [10], [-1], []):
        with pytest.raises(CosmicBakeError, match="eval-layers"):
            resolve_eval_layers(bad, sims)


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=True)
    assert result.exit_code == 0, result.output[-2000:] + repr(result.exception)
    return result


def test_select_with_pca_and_explicit_eval_layers(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama", num_layers=6)
    out = tmp_path / "run"
    common = ["--limit", "16", "--limit-val", "4", "--kl-threshold", "1e9"]
    _run(["select", str(model), "-o", str(out), *common, "--direction-method", "pca", "--eval-layers", "2,4"])
    sel = json.loads((out / "selection.json").read_text())
    assert sel["eval_layers"] == [2, 4] and sel["direction_method"] == "pca"
    assert json.loads((out / "manifest.json").read_text())["direction"]["direction_method"] == "pca"
    bad = CliRunner().invoke(cli, ["select", str(model), "-o", str(tmp_path / "x"), "--eval-layers", "a,b"])
    assert bad.exit_code != 0 and "--eval-layers" in str(bad.exception) and not (tmp_path / "x").exists()


def test_compare_table_matches_separate_selects(tiny_model_factory, tmp_path):
    model = tiny_model_factory("qwen2", num_layers=6)
    common = ["--limit", "16", "--limit-val", "4", "--kl-threshold", "1e9", "--batch-size", "8"]
    out, run = tmp_path / "cmp", tmp_path / "run"
    result = _run(
        [
            "compare",
            str(model),
            "-o",
            str(out),
            *common,
            "--eval-harmful",
            "builtin:harmful",
            "--eval-harmless",
            "builtin:harmless",
            "--limit-eval-harmful",
            "3",
            "--limit-eval-harmless",
            "3",
            "--max-new-tokens",
            "3",
        ]
    )
    assert "| selector |" in result.output
    assert {"compare.json", "compare.md", "compare.png", "manifest.json", "eval_unedited.json"} <= {
        p.name for p in out.iterdir()
    }
    rows = {r["selector"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert set(rows) == {"unedited", "cosmic", "refusal-score"}
    assert rows["unedited"]["harmless_kl"] == 0.0 and rows["cosmic"]["harmless_kl"] > 0.0
    # COSMIC's row is what a plain select on the same prompts chooses
    _run(["select", str(model), "-o", str(run), *common])
    chosen = json.loads((run / "selection.json").read_text())["chosen"]
    assert (rows["cosmic"]["position"], rows["cosmic"]["layer"]) == (chosen["position"], chosen["layer"])
    assert (out / "cosmic" / "direction.safetensors").is_file()
    if rows["refusal-score"]["position"] is None:  # random weights: Arditi's filters may leave nothing
        assert rows["refusal-score"]["note"].startswith("no choice")
