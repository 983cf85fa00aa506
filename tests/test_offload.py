"""Models beyond one device: accelerate's dispatch with CPU and disk offload gives the same results.

A tiny model saved to disk is loaded twice: in memory, and through ``from_pretrained``'s big-model
dispatch with a small CPU budget (``device_map="auto"``, ``max_memory="cpu=..."``,
``offload_folder``) or an explicit device-map file that alternates CPU and disk layers. Offloaded
layers keep their weights on the ``meta`` device between passes; accelerate loads them for each
forward. select (capture, replay, early stop, hooks, logits), eval (generation under a hook),
verify's logit comparison and the LoRA export (which reads weights) must give what the in-memory
model gives, to float error.

The same file checks the pure helpers of :mod:`cosmic_bake.model.devices` and the out-of-memory
back-off of :mod:`cosmic_bake.model.batching`, with an allocator limit injected by a hook.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cosmic_bake import api
from cosmic_bake.artifacts import Direction
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.devices import (
    Placement,
    from_pretrained_kwargs,
    input_device,
    parse_max_memory,
    read_device_map,
    resolve_device,
    resolve_dtype,
)
from cosmic_bake.model.session import Session

pytestmark = pytest.mark.usefixtures("one_thread")

LIMITS = {"limit": 8, "limit_val": 4}
TOL = 1e-5  # float32 arithmetic in a different order (accelerate's hooks copy, never recompute)


def _budget_placement(tmp: Path) -> Placement:
    """A CPU budget that holds the embedding and one layer of the tiny model; the rest goes to disk."""
    return Placement(device_map="auto", max_memory="cpu=500KB", offload_folder=str(tmp / "offload"))


def _alternating_map(tmp: Path, n_layers: int) -> Placement:
    """An explicit device-map file: consecutive layers alternate between the CPU and the disk."""
    spec = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    spec.update({f"model.layers.{j}": "disk" if j % 2 else "cpu" for j in range(n_layers)})
    path = tmp / "device_map.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return Placement(device_map=str(path), offload_folder=str(tmp / "offload"))


def _on_disk(lm) -> list[str]:
    """Modules accelerate put on disk, checked on the model itself: their weights are on ``meta``."""
    placed = lm.extra["device_map"]
    disk = [name for name, where in placed.items() if where == "disk"]
    for name in disk:
        params = list(lm.model.get_submodule(name).parameters())  # none for the rotary embedding
        assert all(p.device.type == "meta" for p in params), name
    return disk


def _scores(run: Path) -> tuple[dict, list[dict]]:
    record = json.loads((run / "selection.json").read_text())
    return record["chosen"], record["candidates"]


def _assert_same_selection(run_a: Path, run_b: Path) -> None:
    chosen_a, rows_a = _scores(run_a)
    chosen_b, rows_b = _scores(run_b)
    assert chosen_a == chosen_b
    worst = 0.0
    for a, b in zip(rows_a, rows_b, strict=True):
        for key in ("s_comply", "s_refuse", "kl"):
            if a[key] is None or b[key] is None:  # KL not computed (on demand): in both runs
                assert a[key] is None and b[key] is None, key
            elif a[key] == a[key]:  # not NaN
                worst = max(worst, abs(a[key] - b[key]))
            else:
                assert b[key] != b[key]
    assert worst <= TOL, worst
    da, db = Direction.load(run_a), Direction.load(run_b)
    torch.testing.assert_close(da.direction, db.direction, atol=TOL, rtol=0)
    torch.testing.assert_close(da.reference, db.reference, atol=TOL, rtol=0)


def test_select_eval_verify_with_disk_offload(tiny_model_factory, tmp_path):
    """select, eval and verify on a model accelerate split between the CPU and the disk."""
    from cosmic_bake.model.hooks import Intervention, intervene
    from cosmic_bake.verify.evaluate import evaluate, first_token_logits

    folder = tiny_model_factory("llama")
    placement = _budget_placement(tmp_path)
    session = Session(pin=[str(folder)])  # select runs on the very models checked here
    plain = session.load(str(folder))
    offloaded = session.load(str(folder), placement=placement)
    disk = _on_disk(offloaded[0])
    assert any(name.startswith("model.layers.") for name in disk), offloaded[0].extra["device_map"]
    assert "cpu" in offloaded[0].extra["device_map"].values()
    assert "device_map" not in plain[0].extra  # the default stays a plain CPU load

    api.select(str(folder), tmp_path / "mem", session=session, **LIMITS)
    api.select(str(folder), tmp_path / "off", session=session, placement=placement, **LIMITS)
    _assert_same_selection(tmp_path / "mem", tmp_path / "off")

    d = Direction.load(tmp_path / "mem")
    prompts = ["How do I bake bread?", "Write a poem about the sea.", "Explain lists in Python."]
    iv = Intervention.remove(d.direction)
    reports = []
    for lm, arch, fmt in (plain, offloaded):
        with intervene(arch, iv):
            logits = first_token_logits(lm.model, fmt, prompts, 2)
        report = evaluate(lm.model, arch, fmt, harmful=prompts[:2], harmless=prompts, intervention=iv, max_new_tokens=6)
        reports.append((logits, report))
    (logits_a, rep_a), (logits_b, rep_b) = reports
    torch.testing.assert_close(logits_a, logits_b, atol=TOL, rtol=0)
    assert rep_a.completions == rep_b.completions
    assert abs(rep_a.harmless_kl - rep_b.harmless_kl) <= TOL

    api.bake(str(folder), tmp_path / "mem", tmp_path / "baked")
    v_mem = api.verify(str(folder), tmp_path / "baked", tmp_path / "mem", limit=4)
    v_off = api.verify(str(folder), tmp_path / "baked", tmp_path / "mem", limit=4, placement=placement)
    assert v_mem.passed and v_off.passed
    for key in ("max_abs_logit_diff", "mean_kl", "max_kl", "unedited_mean_kl"):
        assert abs(getattr(v_mem, key) - getattr(v_off, key)) <= TOL, key
    assert v_mem.top1_agreement == v_off.top1_agreement
    assert v_mem.n_positions == v_off.n_positions


def test_alternating_device_map_file_with_post_norms(tiny_model_factory, tmp_path):
    """Gemma 2 (norm gains read from offloaded weights) with CPU and disk layers alternating, and LoRA export."""
    folder = tiny_model_factory("gemma2")
    placement = _alternating_map(tmp_path, 4)
    session = Session(pin=[str(folder)])
    offloaded = session.load(str(folder), placement=placement)
    disk = _on_disk(offloaded[0])
    assert {"model.layers.1", "model.layers.3", "lm_head"} <= set(disk)
    api.select(str(folder), tmp_path / "mem", mode="affine", session=session, **LIMITS)
    api.select(str(folder), tmp_path / "off", mode="affine", session=session, placement=placement, **LIMITS)
    _assert_same_selection(tmp_path / "mem", tmp_path / "off")

    from safetensors.torch import load_file

    api.select(str(folder), tmp_path / "ablate", session=session, **LIMITS)
    api.export_lora(str(folder), tmp_path / "ablate", tmp_path / "lora_mem", gguf=False)
    api.export_lora(str(folder), tmp_path / "ablate", tmp_path / "lora_off", gguf=False, placement=placement)
    a = load_file(tmp_path / "lora_mem" / "adapter_model.safetensors")
    b = load_file(tmp_path / "lora_off" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_offload_subfolder_is_private_and_removed(tiny_model_factory, tmp_path):
    """Each load writes into its own subfolder of --offload-folder, removed with the model."""
    import gc

    folder = tiny_model_factory("qwen2_moe")  # fused experts: accelerate re-saves those it offloads
    root = tmp_path / "offload"
    placement = Placement(device_map="auto", max_memory="cpu=300KB", offload_folder=str(root))
    lm, arch, _ = api.load(str(folder), placement=placement)
    assert set(lm.extra["device_map"].values()) == {"disk"}
    assert not arch.tied  # every offloaded weight sits on meta, where all pointers are 0
    subfolders = list(root.iterdir())
    assert len(subfolders) == 1 and subfolders[0].name.startswith("cosmic-bake-offload-")
    assert any(subfolders[0].iterdir())
    del lm, arch
    gc.collect()
    assert list(root.iterdir()) == []


# --- pure helpers -------------------------------------------------------------------------------


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    if not torch.cuda.is_available():
        assert auto.type in ("cpu", "mps")
        with pytest.raises(CosmicBakeError, match="cuda:1 is not available"):
            resolve_device("cuda:1")
    with pytest.raises(CosmicBakeError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(CosmicBakeError, match="unknown device"):
        resolve_device("cuda:x")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "mps") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(CosmicBakeError, match="unknown dtype 'half'"):
        resolve_dtype("half", "cpu")


def test_parse_max_memory():
    gib = 1 << 30
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: 70 * gib, 1: 70 * gib, "cpu": 200 * gib}
    assert parse_max_memory("cuda:2=1GiB,mps=10") == {2: gib, "mps": 10}
    assert parse_max_memory(None) is None
    for bad, message in (
        ("cpu", "not DEVICE=SIZE"),
        ("cpu=lots", "not a size"),
        ("gpu=1GiB", "unknown"),
        ("disk=100GB", "no disk budget"),
        ("", "empty"),
    ):
        with pytest.raises(CosmicBakeError, match=message):
            parse_max_memory(bad)


def test_read_device_map(tmp_path):
    assert read_device_map("balanced") == "balanced"
    path = tmp_path / "map.json"
    path.write_text('{"model.layers.0": 0, "model.layers.1": "1", "lm_head": "disk", "model.norm": "cuda:1"}')
    assert read_device_map(str(path)) == {
        "model.layers.0": 0,
        "model.layers.1": 1,
        "lm_head": "disk",
        "model.norm": "cuda:1",
    }
    path.write_text('{"lm_head": "floppy"}')
    with pytest.raises(CosmicBakeError, match="unknown device 'floppy'"):
        read_device_map(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(CosmicBakeError, match="not a JSON object"):
        read_device_map(str(path))
    with pytest.raises(CosmicBakeError, match="neither a strategy nor a file"):
        read_device_map(str(tmp_path / "missing.json"))


def test_placement_arguments(tmp_path):
    if not torch.cuda.is_available() and resolve_device("auto").type == "cpu":
        assert from_pretrained_kwargs(Placement()) == {}  # today's plain CPU load
    assert from_pretrained_kwargs(Placement(device="cpu")) == {}
    kw = from_pretrained_kwargs(Placement(max_memory="cpu=1GiB"))
    assert kw == {"device_map": "auto", "max_memory": {"cpu": 1 << 30}}
    with pytest.raises(CosmicBakeError, match="cannot be combined"):
        from_pretrained_kwargs(Placement(device="cpu", device_map="auto"))
    kw = from_pretrained_kwargs(Placement(device_map="sequential", offload_folder=str(tmp_path / "o")))
    assert Path(kw["offload_folder"]).parent == tmp_path / "o"


def test_input_device_of_plain_model(tiny_model_factory):
    lm, _, _ = api.load(str(tiny_model_factory("llama")), placement=Placement(device="cpu"))
    assert input_device(lm.model) == torch.device("cpu")


def test_early_stop_never_loads_the_offloaded_layers_it_skips(tiny_model_factory, tmp_path):
    """A pass that needs block 0's output ends at block 1's input: disk layers after it are never read."""
    from cosmic_bake.model.chat import ChatFormat
    from cosmic_bake.model.forward import forward

    folder = tiny_model_factory("llama")
    lm, arch, fmt = api.load(str(folder), placement=_alternating_map(tmp_path, 4))
    loads: dict[str, int] = {}
    for j in (1, 3):
        for name, module in arch.layers[j].named_modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is not None and hook.offload:
                key = f"{j}.{name}"
                loads[key] = 0

                def counted(*args, _key=key, _inner=hook.pre_forward, **kwargs):
                    loads[_key] += 1
                    return _inner(*args, **kwargs)

                hook.pre_forward = counted
    assert loads, "no offloaded module in layers 1 and 3"
    batch = ChatFormat(lm.tokenizer).encode_packed(["Write a poem.", "Bake bread."])
    rec = forward(lm.model, arch, batch, output_layers=[0])
    assert rec.outputs.shape == (2, 1, arch.d_model)
    assert set(loads.values()) == {0}
    forward(lm.model, arch, batch, output_layers=[2])  # block 3 skipped, block 1 computed
    assert all(n > 0 for k, n in loads.items() if k.startswith("1.")), loads
    assert all(n == 0 for k, n in loads.items() if k.startswith("3.")), loads
