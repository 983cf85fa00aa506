"""Benchmark at the scale users work at: a random-weight bf16 checkpoint shaped like Llama-3.1-8B.

    python benchmarks/bench_scale.py [--workdir DIR] [--layers 32] [--verify-layers 2] [--verify-limit 4]
                                     [--steps bake-hf,bake-gguf,verify] [--out bench.json]

Builds, shard by shard (never more than one tensor in memory), a bfloat16 checkpoint with
Llama-3.1-8B's shapes (hidden 4096, 32 layers, MLP 14336, 32 query / 8 key-value heads, vocab
128256, separate output head, llama3 RoPE scaling), sharded as the Hub's (``model-0000N-of-00004``,
at most 5 GB each, with an index), plus a tiny byte-level BPE tokenizer with the Llama 3 chat
template (tests/tiny_models.py; the embedding keeps 128256 rows). Weights ``N(0, 1/sqrt(fan_in))``,
norm gains ``1 + N(0, 0.1)``. Then, one child process per step (peak RSS = its VmHWM; disk =
high-water mark of the step's output folder, polled every 0.1 s):

* the shards are hashed once first (``select`` does that on a real run; the hashes are cached per
  machine, so ``bake`` finds them), and the time is reported on its own.
* ``bake-hf``: ``bake`` against ``shutil.copy`` of the same shard files (best of a copy before and
  one after). Targets: at most 2x the copy's time, peak RSS at most 1.5x the largest shard.
* ``bake-gguf``: ``bake --format gguf --outtype q8_0``: seconds, peak RSS, disk high-water mark
  (target: the output plus at most one shard).
* ``verify``: a second checkpoint, 8B-wide but with ``--verify-layers`` layers, baked to a folder
  and verified (``--dtype``, default float32). Target: peak at most 1.3x the model in that dtype.

Free disk is checked first (the big checkpoint, plus one full copy or bake output at a time;
about 2x the checkpoint, ~33 GB for 32 layers); with less, the checkpoint gets fewer layers (said
in the output). Everything is deleted as soon as it has been measured. Timings on a shared machine
are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _measure import DiskWatch, gib, run_child, weight_bytes, write_json  # noqa: E402
from bench_bake import random_run_dir  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, LAYERS = 4096, 14336, 32, 8, 128256, 32
SHARD_BYTES = 5 * 10**9  # the Hub's max_shard_size="5GB"
COPY_FACTOR, BAKE_RSS_FACTOR, VERIFY_FACTOR = 2.0, 1.5, 1.3

_BAKE = """
import sys, time
from cosmic_bake import api
import cosmic_bake.bake.folder, cosmic_bake.bake.gguf, transformers
model, run, out, fmt = sys.argv[1:5]
_RESULT["baseline_rss_bytes"] = _status("VmRSS")
t = time.perf_counter()
r = api.bake(model, run, out, allow_mismatch=True, **({"format": "gguf", "outtype": "q8_0"} if fmt == "gguf" else {}))
_RESULT["seconds"] = time.perf_counter() - t
_RESULT["timings"] = r.timings if fmt == "hf" else r["timings"]
"""

_VERIFY = """
import sys, time
from cosmic_bake import api
import cosmic_bake.verify.runtime, transformers
model, baked, run, limit, dtype = sys.argv[1:6]
_RESULT["baseline_rss_bytes"] = _status("VmRSS")
t = time.perf_counter()
r = api.verify(model, baked, run, limit=int(limit), dtype=dtype)
_RESULT["seconds"] = time.perf_counter() - t
_RESULT["report"] = {k: getattr(r, k) for k in ("passed", "n_prompts", "n_positions", "max_kl", "mean_kl",
                                              "top1_agreement", "unedited_mean_kl", "ratio", "dtype", "reasons")}
"""


def config(layers: int) -> dict:
    """Llama-3.1-8B's config.json with ``layers`` decoder layers."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    }


def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint in the Hub's order (embedding, layers, norm, head)."""
    kv = KV_HEADS * (HIDDEN // HEADS)
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
        ]
    return [*out, ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def _random(shape: tuple[int, ...], seed: int):
    def make() -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if len(shape) == 1:
            return (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        t = torch.empty(shape, dtype=torch.bfloat16)
        rows = max(1, (1 << 24) // shape[-1])
        for a in range(0, shape[0], rows):  # float32 randoms a block at a time
            t[a : a + rows] = torch.randn((min(rows, shape[0] - a), *shape[1:]), generator=g) / math.sqrt(shape[-1])
        return t

    return make


def build_checkpoint(folder: Path, layers: int) -> dict:
    """Write the checkpoint into ``folder`` shard by shard; returns sizes and seconds."""
    from tiny_models import make_tiny_tokenizer

    from cosmic_bake.export.safetensors_write import DeferredTensor, write_index, write_shards

    t = time.perf_counter()
    folder.mkdir(parents=True)
    shapes = tensor_shapes(layers)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = math.prod(shape) * 2
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    count = len(groups)
    shards = {
        f"model-{i + 1:05d}-of-{count:05d}.safetensors": {
            name: DeferredTensor("BF16", shape, _random(shape, hash(name) % 2**31)) for name, shape in group
        }
        for i, group in enumerate(groups)
    }
    write_shards(shards, dict.fromkeys(shards, {"format": "pt"}), folder)
    write_index(folder, shards, {"total_parameters": 0})
    (folder / "config.json").write_text(json.dumps(config(layers), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "do_sample": False}))
    make_tiny_tokenizer("llama").save_pretrained(folder)
    sizes = [(folder / f).stat().st_size for f in shards]
    return {"seconds": time.perf_counter() - t, "bytes": sum(sizes), "shards": len(sizes), "largest": max(sizes)}


def time_copy(folder: Path, dest: Path) -> float:
    dest.mkdir(parents=True)
    t = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        shutil.copy(f, dest / f.name)
    seconds = time.perf_counter() - t
    shutil.rmtree(dest)
    return seconds


def bake_step(folder: Path, run: Path, work: Path, fmt: str) -> dict:
    out_dir = work / f"out-{fmt}"
    out_dir.mkdir()
    out = out_dir / ("model.gguf" if fmt == "gguf" else "model")
    with DiskWatch(out_dir) as disk:
        res = run_child(_BAKE, str(folder), str(run), str(out), fmt)
    res["disk_peak_bytes"] = disk.peak
    res["output_bytes"] = out.stat().st_size if fmt == "gguf" else weight_bytes(out)
    shutil.rmtree(out_dir)
    return res


def layers_for_disk(work: Path, layers: int) -> int:
    """The most layers (up to ``layers``) whose checkpoint fits twice in the free disk, with 10% to spare."""
    free = shutil.disk_usage(work).free
    per_layer = sum(math.prod(s) * 2 for n, s in tensor_shapes(1) if ".layers." in n)
    fixed = sum(math.prod(s) * 2 for n, s in tensor_shapes(0))
    fit = int((free / 2.2 - fixed) // per_layer)
    return max(1, min(layers, fit))


def run_big(work: Path, layers: int, steps: list[str], res: dict) -> None:
    folder = work / "llama-8b-shaped"
    built = build_checkpoint(folder, layers)
    res["checkpoint"] = {**built, "layers": layers}
    print(
        f"checkpoint  {layers} layers, {gib(built['bytes'])} in {built['shards']} shards "
        f"(largest {gib(built['largest'])}), written in {built['seconds']:.0f} s"
    )
    run = random_run_dir(folder, work / "run")
    largest = built["largest"]
    from cosmic_bake.file_hashes import file_sha256

    t = time.perf_counter()  # what select does once per machine; bake then finds the hashes cached
    for f in sorted(folder.glob("*.safetensors")):
        file_sha256(f)
    res["hash_seconds"] = time.perf_counter() - t
    print(f"hash        {res['hash_seconds']:.0f} s to hash the shards once (cached for every later step)")
    if "bake-hf" in steps:
        copies = [time_copy(folder, work / "copy")]
        hf = bake_step(folder, run, work, "hf")
        copies.append(time_copy(folder, work / "copy"))
        copy = min(copies)
        hf.update(copy_seconds=copy, copy_runs=copies, time_over_copy=hf["seconds"] / copy)
        hf["rss_over_shard"] = hf["peak_rss_bytes"] / largest
        res["bake_hf"] = hf
        print(
            f"bake hf     {hf['seconds']:.0f} s vs copy {copy:.0f} s = {hf['time_over_copy']:.2f}x (target <= "
            f"{COPY_FACTOR}x); peak RSS {gib(hf['peak_rss_bytes'])} = {hf['rss_over_shard']:.2f}x the largest "
            f"shard (target <= {BAKE_RSS_FACTOR}x); disk peak {gib(hf['disk_peak_bytes'])}"
        )
    if "bake-gguf" in steps:
        gg = bake_step(folder, run, work, "gguf")
        gg["disk_over_output"] = gg["disk_peak_bytes"] / gg["output_bytes"]
        gg["rss_over_shard"] = gg["peak_rss_bytes"] / largest
        res["bake_gguf_q8_0"] = gg
        print(
            f"bake gguf   q8_0 {gg['seconds']:.0f} s; peak RSS {gib(gg['peak_rss_bytes'])} "
            f"({gg['rss_over_shard']:.2f}x the largest shard); disk peak {gib(gg['disk_peak_bytes'])} for a "
            f"{gib(gg['output_bytes'])} output (bound output + one shard = {gib(gg['output_bytes'] + largest)})"
        )
    shutil.rmtree(folder)


def run_verify(work: Path, layers: int, limit: int, dtype: str, res: dict) -> None:
    folder = work / "llama-8b-wide"
    built = build_checkpoint(folder, layers)
    run = random_run_dir(folder, work / "run-verify")
    baked = work / "baked-verify"
    run_child(_BAKE, str(folder), str(run), str(baked), "hf")
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    model_bytes = weight_bytes(baked) // 2 * itemsize  # bf16 on disk, ``dtype`` in memory
    v = run_child(_VERIFY, str(folder), str(baked), str(run), str(limit), dtype)
    v.update(layers=layers, dtype=dtype, model_bytes=model_bytes, checkpoint_bytes=built["bytes"])
    v["peak_over_model"] = v["peak_rss_bytes"] / model_bytes
    res["verify"] = v
    r = v["report"]
    print(
        f"verify      {layers} layers, {gib(model_bytes)} in {dtype}: {v['seconds']:.0f} s, {r['n_prompts']} prompts, "
        f"passed {r['passed']} (max KL {r['max_kl']:.2g}, top-1 {r['top1_agreement']:.3f}, ratio {r['ratio']:.3g}); "
        f"peak RSS {gib(v['peak_rss_bytes'])} = "
        f"{v['peak_over_model']:.2f}x the model (target <= {VERIFY_FACTOR}x)"
    )
    for reason in r["reasons"]:
        print(f"            verify: {reason}")
    shutil.rmtree(folder)
    shutil.rmtree(baked)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--layers", type=int, default=LAYERS, help="decoder layers of the big checkpoint")
    p.add_argument("--verify-layers", type=int, default=2, help="decoder layers of the verify checkpoint")
    p.add_argument("--verify-limit", type=int, default=4, help="verify prompts per built-in set")
    p.add_argument("--dtype", default="float32", help="dtype verify computes in")
    p.add_argument("--steps", default="bake-hf,bake-gguf,verify")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    steps = args.steps.split(",")
    res: dict = {"steps": steps}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-scale-") as tmp:
        work = Path(tmp)
        layers = layers_for_disk(work, args.layers)
        res["free_disk_bytes"] = shutil.disk_usage(work).free
        print(f"free disk   {gib(res['free_disk_bytes'])} in {work}")
        if layers < args.layers:
            print(f"            too little for {args.layers} layers: the checkpoint gets {layers}")
        if "bake-hf" in steps or "bake-gguf" in steps:
            run_big(work, layers, steps, res)
        if "verify" in steps:
            run_verify(work, args.verify_layers, args.verify_limit, args.dtype, res)
    write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
