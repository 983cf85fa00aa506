"""Tests for tests/tiny_models.py: every tiny architecture loads with stock transformers, runs, and chats."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import (
    ARCHS,
    CHAT_FAMILY,
    GEMMA_SLIDING_WINDOW,
    HIDDEN_SIZE,
    NUM_EXPERTS,
    POST_INSTRUCTION,
    make_tiny_model,
    make_tiny_tokenizer,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "How do I bake a loaf of bread at home? Please explain step by step.",
    "Hi!",
]

# Archs where bias=True adds bias tensors that bias=False leaves out; elsewhere bias=True builds the
# very same model as bias=False, so only bias=False is run there.
BIAS_SWITCH = {"llama", "gemma2", "gemma3_text"}
VARIANTS = [
    pytest.param(arch, tied, bias, id=f"{arch}-{'tied' if tied else 'untied'}-{'bias' if bias else 'nobias'}")
    for arch in ARCHS
    for tied in (False, True)
    for bias in ((False, True) if arch in BIAS_SWITCH else (False,))
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny matmuls are far faster on one thread; with spare OpenMP threads, a busy CPU makes each op wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def chat(tokenizer, prompt, system=None, **kw):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


def batch(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize(("arch", "tied", "bias"), VARIANTS)
def test_loads_and_runs_left_padded_chat_batch(tiny_model_factory, arch, tied, bias):
    model, tokenizer = load(tiny_model_factory(arch, tied=tied, bias=bias))

    assert model.config.model_type == arch
    assert model.config.tie_word_embeddings is tied
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (embed.data_ptr() == head.data_ptr()) is tied
    assert model.config.vocab_size == len(tokenizer) == embed.shape[0]
    assert model.config.hidden_size == HIDDEN_SIZE

    enc = batch(tokenizer, [chat(tokenizer, p) for p in PROMPTS])
    assert tokenizer.padding_side == "left"
    assert enc.attention_mask[1, 0] == 0 and enc.attention_mask[:, -1].all()  # short row padded on the left
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, enc.input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert logits[:, -1].std() > 0.1  # random weights give non-degenerate next-token logits

    # Left padding is masked correctly: the padded row's last logits equal an unpadded forward.
    alone = batch(tokenizer, [chat(tokenizer, PROMPTS[1])])
    with torch.no_grad():
        ref = model(**alone).logits
    torch.testing.assert_close(logits[1, -1], ref[0, -1], atol=1e-4, rtol=1e-4)

    params = dict(model.named_parameters())
    biases = [name for name in params if name.endswith(".bias")]
    if arch in BIAS_SWITCH:
        assert bool(biases) is bias
    if arch == "llama" and bias:
        for name in ("self_attn.o_proj.bias", "mlp.down_proj.bias", "self_attn.q_proj.bias"):
            assert f"model.layers.0.{name}" in params
    if arch in ("qwen2", "qwen2_moe"):  # q/k/v biases always, never o_proj
        assert "model.layers.0.self_attn.q_proj.bias" in params
        assert "model.layers.0.self_attn.o_proj.bias" not in params
    if arch in ("mistral", "mixtral", "phi3"):
        assert not biases
    for name in biases:  # non-trivial random biases
        assert params[name].abs().max() > 0.01, name
    gains = [p for n, p in params.items() if "norm" in n]
    assert gains
    centre = 0.0 if arch.startswith("gemma") else 1.0
    for gain in gains:  # noisy gains, not the all-ones / all-zeros default
        assert (gain - centre).abs().max() > 0.01
        assert (gain - centre).abs().mean() < 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_and_special_tokens(tiny_model_factory, arch):
    family = CHAT_FAMILY[arch]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory(arch))
    assert tokenizer.chat_template
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    assert len(tokenizer) <= 512

    text = chat(tokenizer, "Tell me a joke.")
    suffix = POST_INSTRUCTION[family]
    assert text.endswith("Tell me a joke." + suffix)

    # Every special / chat token is one token, and the post-instruction suffix keeps them whole.
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.extra_special_tokens)
    assert len(specials) >= 3
    for token in specials:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
    assert tokenizer.decode(suffix_ids) == suffix
    for token in specials:
        if token in suffix:
            assert tokenizer.convert_tokens_to_ids(token) in suffix_ids, token
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[-len(suffix_ids) :] == suffix_ids
    assert tokenizer.decode(ids) == text  # byte-level round trip

    # System prompt rendered (own turn, or folded into the first user turn); default only for ChatML.
    with_system = chat(tokenizer, "Tell me a joke.", system="Be terse.")
    assert "Be terse." in with_system and with_system.endswith(suffix)
    assert ("You are a helpful assistant." in text) is (family == "chatml")

    # Multi-turn and add_generation_prompt=False.
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
    ]
    multi = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Hello there" in multi and multi.endswith("Bye" + suffix)
    no_gen = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=False)
    assert no_gen.endswith(suffix) is (family == "mistral")  # Mistral's prompt already ends in [/INST]

    # Whatever class AutoTokenizer picked, it tokenizes exactly like the in-memory original.
    original = make_tiny_tokenizer(arch)
    sample = "It's 2024: Hello, world!  Numbers 12345 and symbols #$%&\n\nnew  lines\tand tabs, naïve café."
    for s in (sample, text, with_system, multi):
        assert tokenizer.encode(s, add_special_tokens=False) == original.encode(s, add_special_tokens=False)
    assert tokenizer.encode("hi") == original.encode("hi")  # same bos behaviour
    assert (tokenizer.encode("hi")[0] == tokenizer.bos_token_id) is (family in ("llama3", "mistral", "gemma"))


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_save_loads_identically(tiny_model_factory, arch):
    single = tiny_model_factory(arch)
    sharded = tiny_model_factory(arch, shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((sharded / s).is_file() for s in shards)
    assert not (sharded / "model.safetensors").exists()

    on_disk = {}
    for shard in shards:
        on_disk.update(load_file(sharded / shard))
    reference = load_file(single / "model.safetensors")
    assert on_disk.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(on_disk[key], tensor), key

    (model_a, tokenizer), (model_b, _) = load(single), load(sharded)
    enc = batch(tokenizer, [chat(tokenizer, p) for p in PROMPTS])
    with torch.no_grad():
        torch.testing.assert_close(model_a(**enc).logits, model_b(**enc).logits, rtol=0, atol=0)


def test_architecture_details(tiny_model_factory):
    for arch in ("gemma2", "gemma3_text"):
        config = json.loads((tiny_model_factory(arch) / "config.json").read_text())
        assert config["sliding_window"] == GEMMA_SLIDING_WINDOW
        assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
        model, _ = load(tiny_model_factory(arch))
        layer = model.model.layers[0]
        for norm in ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            assert hasattr(layer, norm)
    assert json.loads((tiny_model_factory("gemma2") / "config.json").read_text())["final_logit_softcapping"] == 30.0

    mixtral = json.loads((tiny_model_factory("mixtral") / "config.json").read_text())
    assert (mixtral["num_local_experts"], mixtral["num_experts_per_tok"], mixtral["intermediate_size"]) == (
        NUM_EXPERTS,
        2,
        64,
    )
    qwen_moe = json.loads((tiny_model_factory("qwen2_moe") / "config.json").read_text())
    assert qwen_moe["num_experts"] == NUM_EXPERTS and qwen_moe["shared_expert_intermediate_size"] == 96
    assert qwen_moe["decoder_sparse_step"] == 1 and qwen_moe["moe_intermediate_size"] == 64
    # transformers 5 saves MoE experts in the hub (per-expert) layout.
    keys = load_file(tiny_model_factory("mixtral") / "model.safetensors").keys()
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys


def test_seed_and_dtype(tmp_path):
    a = load_file(make_tiny_model("llama", tmp_path / "a", num_layers=1) / "model.safetensors")
    b = load_file(make_tiny_model("llama", tmp_path / "b", num_layers=1) / "model.safetensors")
    c = load_file(make_tiny_model("llama", tmp_path / "c", num_layers=1, seed=1) / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight" in a and not any("layers.1." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])

    folder = make_tiny_model("qwen2", tmp_path / "bf16", dtype=torch.bfloat16, num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
