"""GPU check: cosmic_bake on CUDA gives the CPU's answers, and an 8B-shaped model runs select, bake and verify.

    python benchmarks/gpu_check.py                       # on the GPU machine (about 5-8 minutes)
    python benchmarks/gpu_check.py --device cpu --small  # the same steps on tiny shapes, anywhere

Made for a lent machine with torch, transformers 5, accelerate, safetensors and peft but no
network, no ../shared and no llama-cpp-python: every model is built here with random weights,
the tokenizer is the byte-level BPE of ``tests/tiny_models.py`` trained in-process, prompts are
the package's built-in sets. What it checks and prints (also written as JSON to ``--out`` or
``$OUT/gpu_check.json``):

1. small random Llama (hidden 256, 8 layers), selection on the CPU in float32 as the reference:
   * on DEVICE in float32: same choice, every score within ``SCORE_TOL`` (1e-4; float32 sums in
     another order, no TF32);
   * layers alternating between DEVICE and the CPU (accelerate's ``dispatch_model`` with the CPU as
     main device, so consecutive layers really compute on different devices): same choice and
     scores; verify's logit comparison and eval's generation give the CPU's numbers and text;
   * DEVICE with ``device_map="auto"`` and a small GPU budget (CPU-offloaded layers streamed in):
     same choice and scores;
   * DEVICE in bfloat16 (``--dtype auto``): whether the choice is the same, and the largest score
     difference (scores are accumulated in float64 whatever the dtype);
2. an 8B-shaped random bfloat16 Llama (Llama-3.1-8B's shapes and vocabulary; ``--layers`` fewer to
   save time), written sharded like the Hub's (5 GB shards), through select (8 + 4 prompts, batch
   size ``auto``: 128, halved on out-of-memory), bake hf and verify: seconds and peak GPU memory
   of each stage;
3. that nothing imported ``llama_cpp`` or ``gguf`` (they are not installed there; must stay lazy).

Exit status 0 when every check passed. Stages past ``--budget`` seconds are skipped, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cosmic_bake import api  # noqa: E402
from cosmic_bake.model.batching import resolve_batch_size  # noqa: E402
from cosmic_bake.model.devices import Placement, compute_device  # noqa: E402
from cosmic_bake.model.session import Session  # noqa: E402

SCORE_TOL = 1e-4
LAZY = ("llama_cpp", "gguf")
PROMPTS = {"limit": 8, "limit_val": 4, "kl_threshold": 1e9}  # random weights: keep every candidate's scores
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
SMALL_8B = {"hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 8, "num_key_value_heads": 2}


OUT_FILE: list[Path] = []  # where results are written after every stage (a run cut short keeps them)


def _save(results: dict) -> None:
    for path in OUT_FILE:
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


class Stage:
    """Seconds and peak accelerator memory of one stage."""

    def __init__(self, device: torch.device, name: str, results: dict) -> None:
        self.device, self.name, self.results = device, name, results

    def __enter__(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        self.row: dict = {}
        return self.row

    def __exit__(self, *exc) -> None:
        row = {"seconds": round(time.perf_counter() - self.t0, 2), **self.row}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            row["peak_gpu_gib"] = _gib(torch.cuda.max_memory_allocated())
        row["peak_rss_gib"] = _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if exc[0] is not None:
            row["error"] = f"{exc[0].__name__}: {exc[1]}"
        self.results[self.name] = row
        print(f"[{self.name}] {json.dumps(row, default=str)}", flush=True)
        _save(self.results)
        return exc[0] is not None and issubclass(exc[0], Exception)  # record the failure, go on


def _scores(run: Path) -> tuple[dict, dict]:
    record = json.loads((run / "selection.json").read_text())
    rows = {(r["position"], r["layer"]): r for r in record["candidates"]}
    return record["chosen"], rows


def _compare(ref: Path, other: Path) -> dict:
    """Same choice? Largest score difference over every candidate, and the reference's top-2 gap."""
    chosen_a, rows_a = _scores(ref)
    chosen_b, rows_b = _scores(other)
    worst = 0.0
    for key, a in rows_a.items():
        for name in ("s_comply", "s_refuse", "kl"):
            x, y = a[name], rows_b[key][name]
            if x == x or y == y:
                worst = max(worst, abs(x - y) if (x == x and y == y) else float("inf"))
    totals = sorted((r["s_comply"] + r["s_refuse"] for r in rows_a.values() if r["kept"]), reverse=True)
    gap = totals[0] - totals[1] if len(totals) > 1 else None
    return {"same_choice": chosen_a == chosen_b, "max_score_diff": worst, "top2_gap": gap, "chosen": chosen_b}


def _alternating(model, arch, gpu: torch.device) -> dict:
    """Device map: consecutive layers alternate between ``gpu`` and the CPU, the final norm on the CPU."""
    names = {id(m): n for n, m in model.named_modules()}
    layers = names[id(arch.layers)]
    here: int | str = (gpu.index or 0) if gpu.type == "cuda" else str(gpu)
    dm: dict[str, int | str] = {}
    for name, child in model.named_children():
        subs = [f"{name}.{sub}" for sub, _ in child.named_children()]
        if layers in subs:
            dm.update({sub: here for sub in subs if sub != layers})
        else:
            dm[name] = here
    dm[names[id(arch.final_norm)]] = "cpu"
    dm.update({f"{layers}.{j}": "cpu" if j % 2 else here for j in range(arch.n_layers)})
    return dm


def small_checks(device: torch.device, work: Path, results: dict, budget_end: float) -> bool:
    """Step 1; returns whether every gated comparison held."""
    from tiny_models import make_tiny_model

    folder = make_tiny_model("llama", work / "small", hidden_size=256, intermediate_size=512, num_layers=8, seed=3)
    ok = True
    with Stage(torch.device("cpu"), "small: select on cpu (float32, reference)", results):
        api.select(str(folder), work / "run_cpu", placement=Placement(device="cpu"), **PROMPTS)
    variants = [("float32", "device float32", Placement(device=str(device)), True)]
    if device.type == "cuda":
        offload = Placement(device_map="auto", max_memory="0=2MiB,cpu=8GiB", offload_folder=str(work / "off"))
        variants.append(("float32", "device_map auto, 2 MiB GPU budget", offload, True))
    variants.append(("auto", "dtype auto (bfloat16 on a GPU)", Placement(device=str(device)), False))
    for dtype, label, placement, gate in variants:
        name = f"small: select, {label}"
        if time.perf_counter() > budget_end:
            results[name] = {"skipped": "over --budget"}
            continue
        run = work / f"run_{len(results)}"
        with Stage(device, name, results) as row:
            session = Session(pin=[str(folder)])
            lm, _, _ = session.load(str(folder), dtype, placement=placement)
            row["dtype"] = str(lm.dtype)
            row["device_map"] = sorted(set(map(str, lm.extra.get("device_map", {}).values())))
            api.select(str(folder), run, session=session, placement=placement, **PROMPTS)
            row.update(_compare(work / "run_cpu", run))
            if gate:
                row["passed"] = row["same_choice"] and row["max_score_diff"] <= SCORE_TOL
        ok &= "error" not in results[name] and results[name].get("passed", True)
    api.bake(str(folder), work / "run_cpu", work / "small_baked")
    name = "small: verify on device vs cpu (float32)"
    with Stage(device, name, results) as row:
        reports = [
            api.verify(str(folder), work / "small_baked", work / "run_cpu", limit=4, placement=Placement(where))
            for where in ("cpu", str(device))
        ]
        row.update({k: [getattr(r, k) for r in reports] for k in ("passed", "max_abs_logit_diff", "mean_kl")})
        row["passed"] = all(row["passed"]) and abs(reports[0].mean_kl - reports[1].mean_kl) <= SCORE_TOL
    ok &= bool(results[name].get("passed"))
    if time.perf_counter() < budget_end:
        ok &= _mixed(folder, device, work, results)
    return ok


def _direction(run: Path) -> torch.Tensor:
    from cosmic_bake.artifacts import Direction

    return Direction.load(run).direction


def _mixed(folder: Path, device: torch.device, work: Path, results: dict) -> bool:
    """Select, verify's logits and eval with layers alternating between the GPU and the CPU."""
    from accelerate import dispatch_model

    from cosmic_bake.model.hooks import Intervention
    from cosmic_bake.model.loading import load_model
    from cosmic_bake.verify.evaluate import evaluate
    from cosmic_bake.verify.logits import verify as verify_logits

    name = "small: layers alternating gpu/cpu (select, verify logits, eval)"
    with Stage(device, name, results) as row:
        session = Session(pin=[str(folder)])  # select below runs on this (dispatched) model
        lm, arch, fmt = session.load(str(folder), placement=Placement("cpu"))
        dispatch_model(
            lm.model,
            device_map=_alternating(lm.model, arch, device),
            main_device="cpu",  # so CPU layers compute on the CPU, not streamed to the GPU
            skip_keys=getattr(lm.model, "_skip_keys_device_placement", None),
        )
        row["devices"] = sorted({str(p.device) for p in lm.model.parameters()})
        api.select(str(folder), work / "run_mixed", session=session, placement=Placement("cpu"), **PROMPTS)
        row.update(_compare(work / "run_cpu", work / "run_mixed"))
        d = _direction(work / "run_cpu")
        baked = load_model(str(work / "small_baked"), placement=Placement("cpu")).model
        prompts = ["Write a poem about the sea.", "How do I bake bread?", "Explain lists in Python.", "Hi"]
        plain, parch, pfmt = api.load(str(folder), placement=Placement("cpu"))
        mixed = verify_logits(lm.model, arch, baked, d, prompts, fmt, 2)
        cpu = verify_logits(plain.model, parch, baked, d, prompts, pfmt, 2)
        row["verify_logit_diff"] = abs(mixed.max_abs_logit_diff - cpu.max_abs_logit_diff)
        row["verify_kl_diff"] = abs(mixed.mean_kl - cpu.mean_kl)
        iv = Intervention.remove(d)
        a = evaluate(lm.model, arch, fmt, harmful=prompts, harmless=prompts, intervention=iv, max_new_tokens=8)
        b = evaluate(plain.model, parch, pfmt, harmful=prompts, harmless=prompts, intervention=iv, max_new_tokens=8)
        row["eval_same_text"] = a.completions == b.completions
        row["eval_kl_diff"] = abs(a.harmless_kl - b.harmless_kl)
        row["passed"] = bool(
            row["same_choice"]
            and row["max_score_diff"] <= SCORE_TOL
            and row["verify_logit_diff"] <= SCORE_TOL
            and row["verify_kl_diff"] <= SCORE_TOL
            and row["eval_kl_diff"] <= SCORE_TOL
            and row["eval_same_text"]
            and (len(row["devices"]) == 2 or device.type == "cpu")
        )
    return bool(results[name].get("passed"))


def build_8b(folder: Path, device: torch.device, layers: int, small: bool) -> Path:
    """A random bfloat16 Llama with Llama-3.1-8B's shapes (or SMALL_8B), saved in 5 GB shards, with a tokenizer."""
    from tiny_models import make_tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = make_tiny_tokenizer("llama")
    shape = SMALL_8B if small else LLAMA_8B
    config = LlamaConfig(
        vocab_size=128256,
        num_hidden_layers=layers,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    tok.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def big_checks(device: torch.device, work: Path, args, results: dict, budget_end: float) -> bool:
    """Step 2: the 8B-shaped model through select, bake hf and verify."""
    shape = SMALL_8B if args.small else LLAMA_8B
    h, kv = shape["hidden_size"], shape["hidden_size"] * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"])  # bf16 bytes
    rest = 2 * 2 * 128256 * h  # embedding and head
    free = shutil.disk_usage(work).free
    layers = args.layers
    while layers > 2 and 2.2 * (per_layer * layers + rest) > free:  # the source and the baked copy
        layers //= 2
    results["8b: shape"] = {"layers": layers, "model_gib": _gib(per_layer * layers + rest), **shape}
    if layers != args.layers:
        results["8b: shape"]["note"] = f"{args.layers} layers do not fit the free disk ({_gib(free)} GiB)"
    folder = work / "big"
    with Stage(device, "8b: build and save (bf16, 5 GB shards)", results) as row:
        build_8b(folder, device, layers, args.small)
        row["shards"] = len(list(folder.glob("*.safetensors")))
    placement = Placement(device=str(device))
    ok = True
    for name, step in (
        ("8b: select (8 + 4 prompts, batch auto)", lambda row: _big_select(folder, work, placement, row)),
        ("8b: bake hf", lambda row: api.bake(str(folder), work / "big_run", work / "big_baked")),
        ("8b: verify (4 prompts)", lambda row: _big_verify(folder, work, placement, row)),
    ):
        if time.perf_counter() > budget_end:
            results[name] = {"skipped": "over --budget"}
            ok = False
            continue
        with Stage(device, name, results) as row:
            step(row)
        ok &= "error" not in results[name] and results[name].get("passed", True)
    shutil.rmtree(folder, ignore_errors=True)
    return ok


def _big_select(folder: Path, work: Path, placement: Placement, row: dict) -> None:
    start = resolve_batch_size("auto", compute_device(placement), 32)  # --batch-size auto
    api.select(str(folder), work / "big_run", dtype="bfloat16", placement=placement, batch_size=start, **PROMPTS)
    record = json.loads((work / "big_run" / "selection.json").read_text())
    row.update(chosen=record["chosen"], batch_size=record["batch_size"], timings=record["timings"])


def _big_verify(folder: Path, work: Path, placement: Placement, row: dict) -> None:
    report = api.verify(
        str(folder), work / "big_baked", work / "big_run", limit=4, dtype="bfloat16", placement=placement
    )
    row.update(passed=report.passed, mean_kl=report.mean_kl, max_kl=report.max_kl, ratio=report.ratio)
    row["reasons"] = report.reasons


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, mps or cpu")
    parser.add_argument("--small", action="store_true", help="small shapes for the 8B step (runs on a CPU)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the 8B model (default 32; 4 small)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds after which stages are skipped")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default $OUT/gpu_check.json)")
    args = parser.parse_args()
    args.layers = args.layers or (4 if args.small else 32)
    from cosmic_bake.model.devices import resolve_device

    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    budget_end = t0 + args.budget
    results: dict = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    OUT_FILE[:] = [out] if out is not None else []
    lazy_at_import = [m for m in LAZY if m in sys.modules]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        small_ok = small_checks(device, work, results, budget_end)
        big_ok = big_checks(device, work, args, results, budget_end)
    lazy_at_end = [m for m in LAZY if m in sys.modules]
    results["lazy imports"] = {"at import": lazy_at_import, "at end": lazy_at_end, "passed": not lazy_at_end}
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    passed = small_ok and big_ok and not lazy_at_end
    results["passed"] = passed
    _save(results)
    summary = {k: v for k, v in results.items() if not k.startswith("_")}
    print(json.dumps(summary, indent=2, default=str))
    print("PASSED" if passed else "FAILED", f"in {results['total_seconds']} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
