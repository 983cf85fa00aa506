"""GGUF export: every tiny architecture, converted and run by stock llama.cpp, must match transformers.

Each case converts a tiny random HF folder (tests/tiny_models.py), loads it with llama-cpp-python
and compares the logits at every position of a chat-rendered prompt with
``AutoModelForCausalLM`` in float32: top-1 must agree everywhere and the KL must stay under a bound
set from measurement. llama.cpp runs with a float32 KV cache: its default float16 cache is a
runtime choice that alone adds ~1e-6 KL, which would hide conversion errors of that size.

Measured (4 layers, seed 0, one thread): at f32 the SiLU architectures agree to max KL ~1e-12 and
max |dlogit| ~6e-6 (float rounding only). Gemma 2/3 reach ~1.5e-7 / ~2e-3: llama.cpp's CPU GELU
reads a float16 lookup table (rounding the HF activation's input and output to float16 brings
the gap down ~25x), so that part is llama.cpp's, not the file's. At f16, max KL ~3e-6.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import ARCHS
from transformers import AutoModelForCausalLM, AutoTokenizer

import cosmic_bake.export.gguf_convert as gc_mod
import cosmic_bake.export.gguf_vocab as gguf_vocab
from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.export.gguf_convert import ConvertReport, convert_folder
from cosmic_bake.export.gguf_hparams import SUPPORTED_MODEL_TYPES
from cosmic_bake.model.llamacpp import open_llama

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.llama]

GEMMA = ("gemma2", "gemma3_text")
# float32: measured <= 2.8e-12 (SiLU archs) and <= 2.3e-7 (Gemma: llama.cpp's float16 GELU table).
F32_MAX_KL = {arch: (2e-6 if arch in GEMMA else 1e-9) for arch in ARCHS}
F16_MAX_KL = 5e-5  # measured <= 5.2e-6 (weights and llama.cpp's activations rounded to float16)
F16_MIN_TOP1 = 0.95  # measured 100%; near-ties of a random model may flip under float16
BF16_MAX_KL = 2e-3  # measured <= 1.6e-4
PROMPT = "Write a poem about autumn leaves, in 2024: can't we count 12345 leaves?"
GEMMA2_UNTIED = "llama.cpp's gemma2 always ties output to token_embd (an output.weight fails to load)"
GGML_TYPE_F32 = 0


def chat_ids(folder: Path) -> tuple[str, list[int]]:
    """The rendered one-turn chat prompt and the HF tokenizer's ids for it (template supplies bos)."""
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return text, tok(text, add_special_tokens=False)["input_ids"]


def load_llama(path: Path, n_ctx: int = 128):
    return open_llama(
        path,
        logits_all=True,
        n_ctx=n_ctx,
        verbose=False,
        n_threads=1,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
    )


def compare(folder: Path, gguf_path: Path) -> dict[str, float]:
    """llama.cpp vs transformers on the chat prompt: top-1 agreement, max KL(HF || llama.cpp), max |dlogit|."""
    _, ids = chat_ids(folder)
    llm = load_llama(gguf_path)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    p = torch.log_softmax(torch.from_numpy(want), -1)
    q = torch.log_softmax(torch.from_numpy(got), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return {
        "top1": float((want.argmax(-1) == got.argmax(-1)).mean()),
        "kl": float(kl.max()),
        "dlogit": float(np.abs(want - got).max()),
        "n": len(ids),
    }


def fields(path: Path) -> dict[str, object]:
    """A GGUF file's scalar / string metadata (arrays left out)."""
    reader = gguf.GGUFReader(path)
    out: dict[str, object] = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(field.parts[-1]).decode()
        elif field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            out[name] = field.parts[-1][0].item()
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_transformers(arch: str, tied: bool, tiny_model_factory, tmp_path: Path) -> None:
    folder = tiny_model_factory(arch, tied=tied)
    out = tmp_path / "model.gguf"
    if arch == "gemma2" and not tied:
        with pytest.raises(CosmicBakeError, match="always ties"):
            convert_folder(folder, out)
        assert list(tmp_path.iterdir()) == []
        pytest.xfail(GEMMA2_UNTIED)
    report = convert_folder(folder, out)
    assert isinstance(report, ConvertReport)
    assert report.arch == SUPPORTED_MODEL_TYPES[arch] and report.outtype == "f32" and report.warnings == []
    assert report.file_bytes == out.stat().st_size and list(tmp_path.iterdir()) == [out]
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    # tied: no output.weight (llama.cpp ties), except qwen2moe, whose loader requires one (a copy is written)
    assert ("output.weight" in names) == (not tied or arch == "qwen2_moe")
    if arch in ("mixtral", "qwen2_moe"):
        assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"} <= names
    if arch == "qwen2_moe":
        assert {"blk.0.ffn_up_shexp.weight", "blk.0.ffn_gate_inp_shexp.weight"} <= names
    if arch == "phi3":
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names and "blk.0.ffn_gate.weight" not in names

    result = compare(folder, out)
    assert result["n"] > 16  # longer than Gemma's sliding window (8): both attention kinds are exercised
    assert result["top1"] == 1.0, result
    assert result["kl"] < F32_MAX_KL[arch], result


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_logits_close(arch: str, tiny_model_factory, tmp_path: Path) -> None:
    folder = tiny_model_factory(arch, tied=arch == "gemma2")
    out = tmp_path / "model.gguf"
    convert_folder(folder, out, "f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay float32
    if arch in ("mixtral", "qwen2_moe"):
        assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32  # routers too
    result = compare(folder, out)
    assert result["top1"] >= F16_MIN_TOP1, result
    assert result["kl"] < F16_MAX_KL, result


def test_llama_biases_and_llama3_rope(tiny_model_factory, tmp_path: Path) -> None:
    """q/k biases get the same RoPE row permutation as the weights; Llama 3.1 RoPE becomes rope_freqs."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_factory("llama", bias=True), folder)
    config = json.loads((folder / "config.json").read_text())
    # original context 64 with head_dim 16 and theta 1e4 puts frequencies in all three llama3 bands
    config["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (folder / "config.json").write_text(json.dumps(config))
    convert_folder(folder, tmp_path / "m.gguf")
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.ffn_down.bias", "rope_freqs.weight"} <= set(tensors)
    assert tensors["rope_freqs.weight"][0] == 1.0 and tensors["rope_freqs.weight"][-1] == 8.0
    result = compare(folder, tmp_path / "m.gguf")
    assert result["top1"] == 1.0 and result["kl"] < F32_MAX_KL["llama"], result


def test_bf16_and_metadata(tiny_model_factory, tmp_path: Path) -> None:
    folder = tiny_model_factory("llama")
    out = tmp_path / "model.gguf"
    extra = {"cosmic_bake.direction_sha256": "ab" * 32, "cosmic_bake.layer": 3, "cosmic_bake.alpha": 0.5}
    convert_folder(folder, out, "bf16", metadata=extra)
    meta = fields(out)
    assert {k: meta[k] for k in extra} == extra
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.BF16
    result = compare(folder, out)
    assert result["top1"] >= 0.9 and result["kl"] < BF16_MAX_KL, result

    with pytest.raises(CosmicBakeError, match="already set"):
        convert_folder(folder, tmp_path / "again.gguf", metadata={"general.name": "x"})
    with pytest.raises(CosmicBakeError, match="str, int or float"):
        convert_folder(folder, tmp_path / "again.gguf", metadata={"x.y": [1]})  # type: ignore[dict-item]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_tokenizes_chat_like_transformers(arch: str, tiny_model_factory, tmp_path: Path) -> None:
    folder = tiny_model_factory(arch, tied=True)
    out = tmp_path / "model.gguf"
    report = convert_folder(folder, out)
    assert report.tokenizer_pre == ("qwen2" if arch in ("qwen2", "qwen2_moe") else "gpt-2")
    text, ids = chat_ids(folder)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    # and the tokenizer's own bos rule for plain text (llama3 / mistral / gemma add bos, chatml / phi3 do not)
    tok = AutoTokenizer.from_pretrained(folder)
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == tok(PROMPT)["input_ids"]
    meta = fields(out)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id


def _with_pre_tokenizer(folder: Path, dest: Path, pre_tokenizer: dict) -> Path:
    shutil.copytree(folder, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = pre_tokenizer
    (dest / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return dest


@pytest.mark.parametrize(
    ("name", "pre_tokenizer"),
    [
        (
            "llama-bpe",
            {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": {"Regex": gguf_vocab._LLAMA3_REGEX},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                ],
            },
        ),
        (
            "smollm",
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
                ],
            },
        ),
    ],
)
def test_other_pre_tokenizers_match(name: str, pre_tokenizer: dict, tiny_model_factory, tmp_path: Path) -> None:
    """Llama-3's and SmolLM's pre-tokenizers get llama.cpp's names, and then split digits the same way."""
    folder = _with_pre_tokenizer(tiny_model_factory("llama", tied=True), tmp_path / "m", pre_tokenizer)
    report = convert_folder(folder, tmp_path / "m.gguf")
    assert report.tokenizer_pre == name
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(folder)
    for text in (PROMPT, "Numbers 1, 22, 333 and 4444 appear; you'll see 100000 leaves\n\n  in the  park."):
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=False)
            == tok(text, add_special_tokens=False)["input_ids"]
        ), text


def test_unknown_pre_tokenizer_is_default_with_warning(tiny_model_factory, tmp_path: Path) -> None:
    odd = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{N}{1,2}"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    folder = _with_pre_tokenizer(tiny_model_factory("qwen2", tied=True), tmp_path / "m", odd)
    report = convert_folder(folder, tmp_path / "m.gguf")
    assert report.tokenizer_pre == "default"
    assert any("pre-tokenizer" in w for w in report.warnings)
    assert fields(tmp_path / "m.gguf")["tokenizer.ggml.pre"] == "default"


def test_sharded_checkpoint_gives_the_same_tensors(tiny_model_factory, tmp_path: Path) -> None:
    whole = convert_folder(tiny_model_factory("qwen2_moe"), tmp_path / "whole.gguf")
    sharded_folder = tiny_model_factory("qwen2_moe", shard_size="100KB")
    assert (sharded_folder / "model.safetensors.index.json").is_file()
    sharded = convert_folder(sharded_folder, tmp_path / "sharded.gguf")
    assert sharded.n_tensors == whole.n_tensors
    a, b = gguf.GGUFReader(whole.path).tensors, gguf.GGUFReader(sharded.path).tensors
    assert [t.name for t in a] == [t.name for t in b]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name


def test_bad_input_leaves_nothing(tiny_model_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tiny_model_factory("llama", tied=True)
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(CosmicBakeError, match="'gpt_neox'.*supported: llama, mistral") as err:
        convert_folder(folder, out_dir / "m.gguf")
    assert "\n" not in str(err.value)
    (folder / "config.json").write_text(json.dumps(config))

    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(CosmicBakeError, match="rope_type 'yarn'"):
        convert_folder(folder, out_dir / "m.gguf")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CosmicBakeError, match=r"llama.cpp's gemma3 has no attn_\w+ bias"):
        convert_folder(tiny_model_factory("gemma3_text", tied=True, bias=True), out_dir / "m.gguf")

    with pytest.raises(CosmicBakeError, match="outtype"):
        convert_folder(folder, out_dir / "m.gguf", "q4_0")
    with pytest.raises(CosmicBakeError, match="does not exist"):
        convert_folder(folder, tmp_path / "missing" / "m.gguf")

    # a failure while tensors are being written removes the temporary file
    calls = {"n": 0}
    real = gc_mod._produce

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(gc_mod, "_produce", failing)
    with pytest.raises(OSError, match="disk full"):
        convert_folder(folder, out_dir / "m.gguf")
    assert list(out_dir.iterdir()) == []
    monkeypatch.undo()

    # SentencePiece-style tokenizers are refused with a one-line message
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CosmicBakeError, match="not supported yet"):
        convert_folder(folder, out_dir / "m.gguf")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(CosmicBakeError, match="SentencePiece"):
        convert_folder(folder, out_dir / "m.gguf")
    assert list(out_dir.iterdir()) == []
