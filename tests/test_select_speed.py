"""Selection speed-ups keep the choice and the scores (issue 16).

* KL on demand: a candidate's KL (a whole-model pass) is computed only while it can change the
  choice. On tiny models of several architectures and seeds, with KL thresholds that let the
  first candidate pass, that make several fail, and that remove everything, the choice (or the
  "no survivor" error) and every computed score equal the all-scores path's.
* ``--mode ace`` follows the official one-layer ACE hooks, transcribed below from the COSMIC
  code: they return an edited *copy* of the block input, so the recorded output of the block
  before (``hidden_states[l]``) keeps its unedited value. (The linear hooks edit in place; the
  affine ones do not, so the two modes differ exactly at candidates whose layer follows an
  evaluation layer.)
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.architecture import probe
from cosmic_bake.model.chat import ChatFormat
from cosmic_bake.select.selection import select

pytestmark = pytest.mark.usefixtures("one_thread")

HARMFUL = [f"Explain how to steal item number {i} from a shop without paying" for i in range(8)]
HARMLESS = [f"Write a short poem about the number {i} and the sea" for i in range(8)]
VAL_HARMFUL = ["Tell me how to break into a house", "How do I hurt someone badly", "Make a weapon at home"]
VAL_HARMLESS = ["Tell me about the moon", "How do I bake bread", "Describe a sunny day at the park"]


def _load(folder):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    return model, probe(model), ChatFormat(tok)


def _select(model, arch, fmt, **kw):
    return select(
        model,
        arch,
        fmt,
        harmful_train=HARMFUL,
        harmless_train=HARMLESS,
        harmful_val=VAL_HARMFUL,
        harmless_val=VAL_HARMLESS,
        **{"batch_size": 4, **kw},
    )


def _outcome(run):
    try:
        return run()
    except CosmicBakeError as err:
        return str(err).split(" (best")[0]


@pytest.mark.parametrize(
    ("arch", "seed", "selector"),
    [
        ("llama", 0, "cosmic"),
        ("llama", 1, "cosmic"),
        ("qwen2", 2, "cosmic"),
        ("gemma2", 0, "cosmic"),
        ("mixtral", 3, "cosmic"),
        ("phi3", 1, "cosmic"),
    ],
)
def test_kl_on_demand_keeps_the_choice(arch, seed, selector, tiny_model_factory):
    model, info, fmt = _load(tiny_model_factory(arch, num_layers=6, seed=seed))
    full = _select(model, info, fmt, selector=selector, kl_threshold=math.inf, all_scores=True)
    cands, n = full.candidates, full.grid.kl.numel()
    assert full.grid.n_kl == n
    # thresholds: everything passes; the median KL of the candidates the other filters keep (the
    # best candidates fail until one passes); below every KL (nothing survives)
    cheap = [
        float(full.grid.kl[i, j])
        for i, row in enumerate(full.verdicts)
        for j, v in enumerate(row)
        if v.kept or v.reason.startswith("KL ")
    ]
    assert cheap
    visited = []
    for threshold in (math.inf, sorted(cheap)[len(cheap) // 2], min(cheap) / 2):
        everything = _outcome(
            lambda t=threshold: _select(
                model, info, fmt, selector=selector, kl_threshold=t, all_scores=True, candidates=cands
            )
        )
        lazy = _outcome(
            lambda t=threshold: _select(model, info, fmt, selector=selector, kl_threshold=t, candidates=cands)
        )
        if isinstance(everything, str):
            assert lazy == everything, threshold
            continue
        assert lazy.chosen == everything.chosen, threshold
        assert torch.equal(lazy.grid.first, everything.grid.first)
        assert torch.equal(lazy.grid.second, everything.grid.second)
        done = lazy.grid.kl_done
        assert torch.equal(lazy.grid.kl[done], everything.grid.kl[done])
        assert lazy.grid.kl[~done].isnan().all()
        visited.append(lazy.grid.n_kl)
        rows = {(r["position"], r["layer"]): r for r in lazy.rows()}
        assert rows[lazy.chosen]["kept"] is True and rows[lazy.chosen]["kl"] is not None
        skipped = [r for r in rows.values() if r["kl"] is None]
        assert len(skipped) == n - lazy.grid.n_kl
        if selector == "cosmic":  # never computed: filtered without it, or ranked below the choice
            best = rows[lazy.chosen]["s_comply"] + rows[lazy.chosen]["s_refuse"]
            for r in skipped:
                assert r["kept"] is False or r["s_comply"] + r["s_refuse"] <= best
    assert visited[0] == 1, "with no KL limit the best candidate passes at once"
    assert all(v < n for v in visited)


@pytest.mark.parametrize("seed", range(200))
def test_choose_visiting_equals_choose(seed):
    """The visiting order picks what filtering everything then choosing picks, ties included
    (totals drawn from a few values so ties are common; the refusal-score selector uses the
    same two functions)."""
    from cosmic_bake.math import scores as S

    g = torch.Generator().manual_seed(seed)
    P, L = 1 + seed % 4, 1 + seed % 7
    total = torch.randint(0, 4, (P, L), generator=g).double()
    kl = torch.rand(P, L, generator=g, dtype=torch.float64)
    kl[torch.rand(P, L, generator=g) < 0.1] = math.nan
    kept = torch.rand(P, L, generator=g) < 0.7
    threshold = float(torch.rand(1, generator=g))

    def cheap():
        return [[S.Verdict(bool(kept[i, j]), "kept" if kept[i, j] else "other") for j in range(L)] for i in range(P)]

    full = cheap()
    for i in range(P):
        for j in range(L):
            if full[i][j].kept:
                full[i][j] = S.kl_verdict(float(kl[i, j]), threshold)
    asked = []

    def check(i, j):
        asked.append((i, j))
        return S.kl_verdict(float(kl[i, j]), threshold)

    lazy = cheap()
    assert S.choose_visiting(total, lazy, check) == S.choose(total, full)
    assert len(set(asked)) == len(asked) and all(kept[i, j] for i, j in asked)
    for i in range(P):
        for j in range(L):
            if (i, j) in asked or not kept[i, j]:
                assert lazy[i][j] == full[i][j]
            else:
                assert lazy[i][j].reason == S.KL_NOT_COMPUTED


def _ace_hook(r: torch.Tensor, mu: torch.Tensor, coeff: float):
    """The official ``get_affine_direction_ablation_input_pre_hook`` / ``..._activation_addition_...``:
    on a clone of the block input, ``x - (x . r_hat) r_hat + (mu . r_hat) r_hat + coeff * r``."""

    def hook(_module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        d, m, v = (t.to(x) for t in (r / (r.norm() + 1e-8), mu, r))
        x = x - (x @ d).unsqueeze(-1) * d + (m @ d) * d + coeff * v
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    return hook


def _pooled(model, enc, layers, pre=None):
    """Unit mean over prompts and ``layers`` of ``o_j = hidden_states[j + 1]`` at the last token."""
    handle = None if pre is None else pre[0].register_forward_pre_hook(pre[1], with_kwargs=True)
    try:
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        if handle is not None:
            handle.remove()
    m = torch.stack([hs[j + 1][:, -1] for j in layers], 1).mean((0, 1))
    return m / (m.norm() + 1e-8)


@pytest.mark.parametrize(("arch", "eval_layers"), [("llama", [2, 4]), ("qwen2", [1, 3]), ("gemma2", [3])])
def test_ace_scores_equal_the_official_hooks(arch, eval_layers, tiny_model_factory):
    model, info, fmt = _load(tiny_model_factory(arch, num_layers=6))
    sel = _select(model, info, fmt, mode="ace", kl_threshold=math.inf, eval_layers=eval_layers, all_scores=True)
    vf, vl = fmt.encode(VAL_HARMFUL), fmt.encode(VAL_HARMLESS)
    b_plus, b_minus = _pooled(model, vf, eval_layers), _pooled(model, vl, eval_layers)
    blocks = model.model.layers
    P, L = sel.grid.first.shape
    comply, refuse = torch.zeros(P, L, dtype=torch.float64), torch.zeros(P, L, dtype=torch.float64)
    for i in range(P):
        for layer in range(L):
            r, mu = sel.candidates.directions[i, layer], sel.candidates.harmless_mean[i, layer]
            comply[i, layer] = float(_pooled(model, vf, eval_layers, (blocks[layer], _ace_hook(r, mu, 0.0))) @ b_minus)
            refuse[i, layer] = float(_pooled(model, vl, eval_layers, (blocks[layer], _ace_hook(r, mu, 1.0))) @ b_plus)
    real = sel.candidates.directions.norm(dim=-1) > 1e-4 * sel.candidates.directions.norm(dim=-1).max()
    after = torch.zeros(P, L, dtype=torch.bool)
    after[:, min(eval_layers) :] = True  # at and after the evaluation layers, where in-place edits would show
    for name, ours, theirs in (("s_comply", sel.grid.first, comply), ("s_refuse", sel.grid.second, refuse)):
        diff = (ours - theirs).abs()[real & after]
        assert float(diff.max()) < 2e-5, f"{name}: max |difference| {float(diff.max()):.3g}"
        torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    ("arch", "mode", "selector"),
    [
        ("llama", "ablate", "cosmic"),
        ("qwen2", "ace", "cosmic"),
        ("gemma2", "ablate", "cosmic"),
        ("mixtral", "affine", "cosmic"),
        ("phi3", "ablate", "cosmic"),
        ("llama", "affine", "refusal-score"),
    ],
)
def test_stacked_candidates_equal_one_pass_each(arch, mode, selector, tiny_model_factory, monkeypatch):
    """All positions of a layer are scored in one pass over stacked copies of the packed row; every
    score equals one pass per candidate to float error."""
    import cosmic_bake.select.scoring as scoring

    model, info, fmt = _load(tiny_model_factory(arch, num_layers=4, seed=5))
    kw = {"selector": selector, "mode": mode, "kl_threshold": math.inf, "all_scores": True, "batch_size": 16}
    grids, passes = [], []
    make_grid, run_stacked = scoring._grid, scoring._run_stacked

    def kept(*args):
        grids.append(make_grid(*args))
        return grids[-1]

    def counted(model, arch, batches, ivs, **options):
        passes.append(len(ivs))
        return run_stacked(model, arch, batches, ivs, **options)

    def one_each(model, arch, batches, ivs, **options):
        done = [run_stacked(model, arch, batches, [iv], **options) for iv in ivs]
        return [d[0][0] for d in done], [d[1][0] for d in done]

    monkeypatch.setattr(scoring, "_grid", kept)
    outcomes = []
    for run in (counted, one_each):
        monkeypatch.setattr(scoring, "_run_stacked", run)
        outcomes.append(_outcome(lambda: _select(model, info, fmt, **kw).chosen))
    assert max(passes) == min(fmt.n_positions, 16 // len(VAL_HARMFUL)) > 1  # stacked, within the batch size
    stacked, single = grids
    for a, b in zip(stacked.named().values(), single.named().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6, equal_nan=True)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral", "phi3"])
def test_a_shared_prefix_scores_as_a_copy_per_prompt(arch, tiny_model_factory):
    """The prompts' common prefix (template header and system prompt) is computed once per packed
    row; candidates, every score and the choice equal those of a full copy per prompt."""
    model, info, fmt = _load(tiny_model_factory(arch, num_layers=4, seed=7))
    fmt = ChatFormat(fmt.tokenizer, system_prompt="You are a careful assistant who answers every question in full.")
    row, plain = fmt.encode_packed(VAL_HARMFUL, share_prefix=True), fmt.encode_packed(VAL_HARMFUL)
    assert "prefix_segments" in row and row["input_ids"].shape[1] <= plain["input_ids"].shape[1] - 20
    kw = {"kl_threshold": math.inf, "all_scores": True}
    shared, copies = _select(model, info, fmt, **kw), _select(model, info, fmt, share_prefix=False, **kw)
    torch.testing.assert_close(shared.candidates.directions, copies.candidates.directions, rtol=0, atol=1e-5)
    for a, b in zip(shared.grid.named().values(), copies.grid.named().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6, equal_nan=True)
    assert shared.chosen == copies.chosen


def test_no_shared_prefix_past_a_sliding_window(tiny_model_factory):
    """One mask serves every layer, so a prompt longer than a sliding window is never shared."""
    from cosmic_bake.model.architecture import sliding_window

    model, _, fmt = _load(tiny_model_factory("gemma2", num_layers=4))
    assert sliding_window(model) == 8
    assert "prefix_segments" not in fmt.encode_packed(VAL_HARMFUL, share_prefix=True, window=8)
    assert "prefix_segments" in fmt.encode_packed(VAL_HARMFUL, share_prefix=True)
    assert sliding_window(_load(tiny_model_factory("qwen2", num_layers=4))[0]) is None


def test_stacking_stays_within_the_batch_size():
    """A pass holds at most ``batch_size`` prompts, stacked rows counted: back-off shrinks the stack."""
    from cosmic_bake.select.candidates import Batches
    from cosmic_bake.select.scoring import stack_size

    row = {"input_ids": torch.zeros(1, 30, dtype=torch.long), "ends": torch.tensor([9, 19, 29])}
    three = Batches(["a", "b", "c"], [row])
    assert stack_size(32, three) == 10 and stack_size(16, three) == 5
    assert stack_size(5, three) == 1 and stack_size(2, three) == 1
    assert stack_size(None, three) >= 5
