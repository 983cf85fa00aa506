"""Tiny random causal LMs of every architecture cosmic_bake supports, saved as real HF folders.

``make_tiny_model(arch, folder, ...)`` writes ``config.json``, safetensors weights (optionally
sharded, with ``model.safetensors.index.json``), ``generation_config.json`` and a real fast
tokenizer (``tokenizer.json``, ``tokenizer_config.json``, and the family's chat template, which
transformers 5 writes to ``chat_template.jinja``) into ``folder``. Both
``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` load
it with stock transformers, offline.

Shapes: hidden 64, 4 heads x head_dim 16, 2 KV heads, MLP intermediate 128, 256 positions,
``num_layers`` decoder layers (default 4), vocab = tokenizer size (~512, byte-level BPE).

Per-architecture meaning of ``tied`` / ``bias`` (HF class; config switch each flag sets):

==============  ====================  =====================  ================================================
arch            HF class              tied=True              bias=True
==============  ====================  =====================  ================================================
llama           LlamaForCausalLM      tie_word_embeddings    attention_bias + mlp_bias (q/k/v/o, gate/up/down)
qwen2           Qwen2ForCausalLM      tie_word_embeddings    no-op: q/k/v biases always on, o_proj never
mistral         MistralForCausalLM    tie_word_embeddings    ignored (no switch)
gemma2          Gemma2ForCausalLM     tie_word_embeddings    attention_bias (q/k/v/o) - the config has it
gemma3_text     Gemma3ForCausalLM     tie_word_embeddings    attention_bias (q/k/v/o) - the config has it
phi3            Phi3ForCausalLM       tie_word_embeddings    ignored (no switch; fused qkv_proj/gate_up_proj)
mixtral         MixtralForCausalLM    tie_word_embeddings    ignored (no switch)
qwen2_moe       Qwen2MoeForCausalLM   tie_word_embeddings    no-op: qkv_bias always True (like real Qwen-MoE)
==============  ====================  =====================  ================================================

``tied=False`` is honoured everywhere, including Gemma (whose real checkpoints are always tied).

Architecture details:

* MoE: 4 experts, top-2, expert intermediate 64. ``mixtral`` uses ``intermediate_size`` as the
  expert size (no dense MLP). ``qwen2_moe``: ``moe_intermediate_size`` 64, shared expert 96 (with
  its sigmoid ``shared_expert_gate``), ``decoder_sparse_step`` 1 so every layer is sparse,
  ``norm_topk_prob`` False (HF default). In transformers 5 the experts live in memory as fused 3-D
  parameters (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I];
  Mixtral's block is ``mlp`` not ``block_sparse_moe``), but ``save_pretrained`` reverts them to the
  hub layout on disk (``block_sparse_moe.experts.N.w1/w2/w3`` for Mixtral,
  ``mlp.experts.N.gate_proj/up_proj/down_proj`` for Qwen2-MoE).
* Gemma 2 / 3: sandwich norms kept, ``sliding_window`` 8, ``layer_types`` alternate
  sliding/full so both attention kinds run, ``query_pre_attn_scalar`` = head_dim (16), soft-capping
  left at the config defaults (Gemma 2: attn 50 / final 30; Gemma 3: none). RMSNorm gains use
  the ``(1 + weight)`` convention, so their random gains are centred on 0, not 1.
* Phi-3: fused ``qkv_proj`` and ``gate_up_proj``; no sliding window.

Weights: every parameter is re-initialised from a local ``torch.Generator(seed)``: matrices and
expert tensors ``N(0, 1/sqrt(fan_in))`` (fan_in = last dim; keeps activations O(1)), biases
``N(0, 0.1)``, norm gains ``1 + N(0, 0.1)`` (Gemma: ``N(0, 0.1)``). So biases and gains are
non-trivial and a bake that drops one is caught. Logits are finite.

Tokenizer families (``CHAT_FAMILY``): byte-level BPE trained in-process on built-in text, wrapped
in ``PreTrainedTokenizerFast`` (== ``TokenizersBackend`` in transformers 5), ``padding_side`` left,
every chat/control token a single special token. ``AutoTokenizer`` reloads it as
``TokenizersBackend``, except the ChatML family, which reloads as ``Qwen2Tokenizer`` (transformers
forces that class for model_type "qwen2" and rebuilds the BPE with Qwen's pre-tokenizer regex, so
the chatml backend is trained with that exact regex + NFC, and ``tokenizer_class`` is written as
``Qwen2Tokenizer`` for qwen2_moe too). ``POST_INSTRUCTION[family]`` is the exact text a
one-user-message render with ``add_generation_prompt=True`` ends with.

==========  ===============  ============================  =============================  ========
family      archs            bos / eos / pad               chat tokens                    add bos
==========  ===============  ============================  =============================  ========
llama3      llama            <|begin_of_text|> /           <|start_header_id|>,           yes
                             <|eot_id|> /                  <|end_header_id|>,
                             <|finetune_right_pad_id|>     <|end_of_text|>
chatml      qwen2, qwen2_moe None / <|im_end|> /           <|im_start|>                   no
                             <|endoftext|>
mistral     mistral, mixtral <s> / </s> / <pad>            [INST], [/INST]                yes
gemma       gemma2,          <bos> / <eos> / <pad>         <start_of_turn>,               yes
            gemma3_text                                    <end_of_turn>
phi3        phi3             <s> / <|endoftext|> /         <|system|>, <|user|>,          no
                             <|endoftext|> (pad == eos)    <|assistant|>, <|end|>
==========  ===============  ============================  =============================  ========

"add bos" = the tokenizer's post-processor prepends bos when ``add_special_tokens=True`` (as the
real tokenizers do); the llama3 / mistral / gemma templates also start with ``bos_token``, so encode
rendered chat text with ``add_special_tokens=False``. Qwen has no bos (``bos_token`` is None).
Mistral's ``add_generation_prompt`` is a no-op (the prompt already ends with ``[/INST]``), as in the
real template. System messages: ChatML/Llama-3/Phi-3 render a system turn (ChatML inserts
"You are a helpful assistant." when none is given); Mistral and Gemma fold it into the first user
turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHS: tuple[str, ...] = (
    "llama",
    "qwen2",
    "mistral",
    "gemma2",
    "gemma3_text",
    "phi3",
    "mixtral",
    "qwen2_moe",
)

CHAT_FAMILY: dict[str, str] = {
    "llama": "llama3",
    "qwen2": "chatml",
    "qwen2_moe": "chatml",
    "mistral": "mistral",
    "mixtral": "mistral",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "phi3": "phi3",
}

HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
MAX_POSITIONS = 256
NUM_EXPERTS = 4
EXPERTS_PER_TOKEN = 2
EXPERT_INTERMEDIATE_SIZE = 64
SHARED_EXPERT_INTERMEDIATE_SIZE = 96
GEMMA_SLIDING_WINDOW = 8
TARGET_VOCAB_SIZE = 512

BIAS_STD = 0.1
GAIN_STD = 0.1

POST_INSTRUCTION: dict[str, str] = {
    "llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<|im_end|>\n<|im_start|>assistant\n",
    "mistral": " [/INST]",
    "gemma": "<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|end|>\n<|assistant|>\n",
}

_LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported after an optional system message.') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + ((first_user_prefix if loop.first else '')"
    " + message['content']) | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<start_of_turn>model\\n' }}"
    "{%- endif %}"
)

_PHI3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|assistant|>\\n' }}"
    "{%- else %}"
    "{{- eos_token }}"
    "{%- endif %}"
)

# Per family: named special tokens, chat tokens, which specials take the first ids (in that order,
# like Mistral's <unk>=0 <s>=1 </s>=2 and Gemma's <pad>=0 <eos>=1 <bos>=2) and which are appended
# after the BPE vocab (like Llama 3 / Qwen / Phi-3), whether bos is auto-added, and the template.
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama3": {
        "named": {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|finetune_right_pad_id|>",
        },
        "front": [],
        "back": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        "extra": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
        "add_bos": True,
        "template": _LLAMA3_TEMPLATE,
    },
    "chatml": {
        "named": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "front": [],
        "back": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "extra": ["<|im_start|>"],
        "add_bos": False,
        "template": _CHATML_TEMPLATE,
    },
    "mistral": {
        "named": {
            "unk_token": "<unk>",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
        },
        "front": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>"],
        "back": [],
        "extra": ["[INST]", "[/INST]"],
        "add_bos": True,
        "template": _MISTRAL_TEMPLATE,
    },
    "gemma": {
        "named": {
            "pad_token": "<pad>",
            "eos_token": "<eos>",
            "bos_token": "<bos>",
            "unk_token": "<unk>",
        },
        "front": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "back": [],
        "extra": ["<start_of_turn>", "<end_of_turn>"],
        "add_bos": True,
        "template": _GEMMA_TEMPLATE,
    },
    "phi3": {
        "named": {
            "unk_token": "<unk>",
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        },
        "front": ["<unk>", "<s>", "</s>"],
        "back": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "extra": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "add_bos": False,
        "template": _PHI3_TEMPLATE,
    },
}

# A few hundred words of plain English (with the kind of requests / refusals cosmic_bake deals
# with) so the BPE learns real merges; byte-level fallback covers every other character.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn how words are built.
Please write a short story about a robot who learns to paint the sea at night.
How do I bake a loaf of bread at home? Mix flour, water, salt and yeast, then wait for the dough
to rise before you put it in a hot oven for about forty minutes.
Explain the difference between a list and a tuple in Python. Lists can change, tuples cannot.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
I'm sorry, but I cannot help with that request. I can't assist with anything that could hurt
people. As an AI assistant, I must refuse to provide instructions for dangerous activities.
Sure, here is a simple recipe. Of course! Here are three ideas you might enjoy this weekend.
Give me a list of five healthy breakfast foods: oats, eggs, yogurt, berries and whole grain toast.
Summarize the main points of the article in two sentences, using clear and simple language.
Translate the following sentence into Spanish: where is the nearest train station, please?
The weather today is sunny with a light breeze from the west, and tomorrow it may rain again.
Write a poem about autumn leaves falling slowly in the quiet park near the old stone bridge.
Can you help me plan a trip to the mountains? We want to hike, swim in a lake and see the stars.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in text, as do symbols such as #, $, %, & and @.
You are a helpful assistant. Answer the user's question honestly and explain your reasoning.
The system should respond to every instruction with care, and it should never make things up.
Tell me how a computer stores information: it uses bits, bytes, memory, disks and networks.
Describe the water cycle: evaporation, condensation, precipitation and collection in rivers.
Why is the sky blue? Sunlight is scattered by the air, and blue light is scattered the most.
Teachers, doctors, farmers, engineers and artists all work together to build a good society.
Harmful, illegal or unethical requests should be declined politely but firmly by the assistant.
Let's think step by step about the problem before we write the final answer in one paragraph.
"""

_TOKENIZER_CACHE: dict[str, str] = {}

# transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX (Qwen splits digits one by one).
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _build_backend(family: str) -> Tokenizer:
    """Train (once per family, cached as JSON) the byte-level BPE backend with its specials."""
    spec = _FAMILIES[family]
    if family not in _TOKENIZER_CACHE:
        front, back = spec["front"], spec["back"]
        tok = Tokenizer(models.BPE())
        if family == "chatml":
            # Exactly what transformers' Qwen2Tokenizer rebuilds on load (see below).
            tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TARGET_VOCAB_SIZE - len(back),
            min_frequency=1,
            special_tokens=list(front),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
        # Registers the front specials as added (never-split) tokens and appends the back ones.
        tok.add_special_tokens(list(front) + list(back))
        _TOKENIZER_CACHE[family] = tok.to_str()
    return Tokenizer.from_str(_TOKENIZER_CACHE[family])


def make_tiny_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """The tiny chat tokenizer of ``arch``'s family (left padding, chat template set)."""
    family = CHAT_FAMILY[arch]
    spec = _FAMILIES[family]
    named = {k: v for k, v in spec["named"].items() if v is not None}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(family),
        **named,
        extra_special_tokens=list(spec["extra"]),
        add_bos_token=spec["add_bos"],
        add_eos_token=False,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = spec["template"]
    return tokenizer


def _layer_types(num_layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def _config_kwargs(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    tied: bool,
    bias: bool,
    num_layers: int,
    hidden_size: int = HIDDEN_SIZE,
    intermediate_size: int = INTERMEDIATE_SIZE,
) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": tied,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch in ("llama", "mistral", "mixtral", "gemma2", "gemma3_text"):
        kw["head_dim"] = HEAD_DIM  # qwen2/qwen2_moe/phi3 derive hidden_size // heads == 16
    if arch == "llama":
        kw["attention_bias"] = bias
        kw["mlp_bias"] = bias
    elif arch == "mistral":
        kw["sliding_window"] = None  # Mistral v0.2+ style: full attention
    elif arch == "phi3":
        kw["original_max_position_embeddings"] = MAX_POSITIONS
    elif arch == "mixtral":
        kw["intermediate_size"] = EXPERT_INTERMEDIATE_SIZE
        kw["num_local_experts"] = NUM_EXPERTS
        kw["num_experts_per_tok"] = EXPERTS_PER_TOKEN
    elif arch == "qwen2_moe":
        kw["num_experts"] = NUM_EXPERTS
        kw["num_experts_per_tok"] = EXPERTS_PER_TOKEN
        kw["moe_intermediate_size"] = EXPERT_INTERMEDIATE_SIZE
        kw["shared_expert_intermediate_size"] = SHARED_EXPERT_INTERMEDIATE_SIZE
        kw["decoder_sparse_step"] = 1
        kw["mlp_only_layers"] = []
        kw["qkv_bias"] = True
    elif arch in ("gemma2", "gemma3_text"):
        kw["attention_bias"] = bias
        kw["sliding_window"] = GEMMA_SLIDING_WINDOW
        kw["layer_types"] = _layer_types(num_layers)
        kw["query_pre_attn_scalar"] = HEAD_DIM
    return kw


def _is_gemma(arch: str) -> bool:
    return arch in ("gemma2", "gemma3_text")


@torch.no_grad()
def _randomize(model: torch.nn.Module, arch: str, seed: int) -> None:
    """Re-initialise every parameter with small non-trivial random values (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    gain_params = {
        id(module.weight)
        for module in model.modules()
        if type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
    }
    gain_centre = 0.0 if _is_gemma(arch) else 1.0
    for name, param in model.named_parameters():
        if id(param) in gain_params:
            values = gain_centre + GAIN_STD * torch.randn(param.shape, generator=gen)
        elif param.ndim == 1:
            if not name.endswith("bias"):
                raise AssertionError(f"unexpected 1-D parameter {name} in tiny {arch}")
            values = BIAS_STD * torch.randn(param.shape, generator=gen)
        else:
            values = torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5
        param.copy_(values.to(param.dtype))


def make_tiny_model(
    arch: str,
    folder: Path,
    *,
    tied: bool = False,
    bias: bool = False,
    seed: int = 0,
    num_layers: int = 4,
    dtype: torch.dtype = torch.float32,
    shard_size: str | None = None,
    hidden_size: int = HIDDEN_SIZE,
    intermediate_size: int = INTERMEDIATE_SIZE,
) -> Path:
    """Build a tiny random ``arch`` causal LM + tokenizer and save both into ``folder``.

    ``shard_size`` (e.g. ``"100KB"``) is passed as ``max_shard_size`` so the checkpoint is split
    into several safetensors files with a ``model.safetensors.index.json``. ``hidden_size`` other
    than 64 is for the architectures that set ``head_dim`` (llama, mistral, mixtral, gemma2,
    gemma3_text): e.g. 72, where bf16(sqrt(72)) = 8.5 differs from sqrt(72) (Gemma's embedding
    scale), or 256 with ``intermediate_size`` 512, so K-quant rows fit (multiples of 256).
    Returns ``folder``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = make_tiny_tokenizer(arch)
    sizes = {"hidden_size": hidden_size, "intermediate_size": intermediate_size}
    config = AutoConfig.for_model(
        arch, **_config_kwargs(arch, tokenizer, tied=tied, bias=bias, num_layers=num_layers, **sizes)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    _randomize(model, arch, seed)
    model = model.to(dtype).eval()

    if shard_size is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=shard_size)
    tokenizer.save_pretrained(folder)
    if CHAT_FAMILY[arch] == "chatml":
        # AutoTokenizer forces Qwen2Tokenizer for model_type "qwen2" whatever tokenizer_config says;
        # declare it for qwen2_moe too (as real Qwen checkpoints do) so both load the same class.
        config_path = folder / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text())
        tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
        config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return folder


def save_direction(run: Path, direction: torch.Tensor, *, layer: int = 1, mode: str = "ablate") -> Path:
    """Write a direction artifact for a tiny model into ``run`` (made here); no model hash, so any model takes it."""
    from cosmic_bake.artifacts import Direction

    run = Path(run)
    run.mkdir(parents=True)
    direction = direction.to(torch.float64)
    Direction(
        direction=direction,
        reference=torch.zeros_like(direction),
        layer=layer,
        position=-1,
        mode=mode,
        selector="cosmic",
        alpha=1.0,
        model_id="tiny",
        model_hash="",
    ).save(run)
    return run


def random_direction_run(folder: Path, run: Path, seed: int = 0) -> Path:
    """A run folder holding a seeded random direction in ``folder``'s hidden size."""
    d_model = json.loads((Path(folder) / "config.json").read_text())["hidden_size"]
    return save_direction(run, torch.randn(d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
