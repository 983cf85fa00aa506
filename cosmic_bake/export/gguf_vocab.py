"""The tokenizer part of a GGUF file, from a transformers ``tokenizer.json`` (byte-level BPE).

llama.cpp does not read a pre-tokenizer from the file: it picks a built-in regex by name
(``tokenizer.ggml.pre``), so the name is derived by comparing ``tokenizer.json``'s pre-tokenizer
with the regexes llama.cpp's ``llama-vocab.cpp`` uses for each name. Tokens are written in id order
with their types (special added tokens as control, other added tokens as user-defined, unused
embedding rows as placeholders); merges, special ids and the chat template come from gguf-py's
:class:`gguf.SpecialVocab`. Used by :mod:`cosmic_bake.export.gguf_convert`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from cosmic_bake.errors import CosmicBakeError, first_line

# Pre-tokenizer regexes as tokenizers writes them in tokenizer.json, and the llama.cpp name whose
# built-in regex (llama-vocab.cpp) splits text the same way.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (pre-tokenizer steps) -> (llama.cpp name, whether llama.cpp then skips merges for whole-word tokens)
_PRE_TOKENIZERS: dict[tuple[tuple, ...], tuple[str, bool]] = {
    (("bytelevel", True),): ("gpt-2", False),  # ByteLevel's own regex is GPT-2's
    (("split", _GPT2_REGEX), ("bytelevel", False)): ("gpt-2", False),
    (("digits", True), ("bytelevel", True)): ("smollm", False),
    (("split", _LLAMA3_REGEX), ("bytelevel", False)): ("llama-bpe", True),
    (("split", _QWEN2_REGEX), ("bytelevel", False)): ("qwen2", False),
}


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    pre: str
    special: gguf.SpecialVocab
    name: str  # general.name: llama.cpp keys a tokenizer quirk on it (see _model_name)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        for kind in ("bos", "eos"):  # explicit, so llama.cpp's per-pre-tokenizer defaults never apply
            self.special.add_special_token.setdefault(kind, False)
        with _quiet_gguf():
            self.special.add_to_gguf(writer, quiet=True)


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """gguf-py logs its tokenizer heuristics at WARNING; they mean nothing to a cosmic-bake user."""
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_vocab(folder: Path, *, n_rows: int, warnings: list[str], name: str | None = None) -> Vocab:
    """Tokens in id order with their types, the pre-tokenizer name, and the special-token side files.

    ``name`` is the model's ``general.name`` (default: the folder's name), adjusted by :func:`_model_name`.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        kind = "a SentencePiece tokenizer.model" if (folder / "tokenizer.model").is_file() else "no tokenizer.json"
        raise CosmicBakeError(
            f"GGUF export supports byte-level BPE tokenizers (tokenizer.json) only; {folder} has {kind}",
            "SentencePiece tokenizers are not supported yet: export with --format hf",
        )
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CosmicBakeError(f"cannot read {path} ({first_line(err)})", "re-download the tokenizer") from err
    model = spec.get("model") or {}
    steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or steps is None or not any(s[0] == "bytelevel" for s in steps):
        raise CosmicBakeError(
            f"GGUF export supports byte-level BPE tokenizers only; {path.name} is a "
            f"{model.get('type')} model with a {(spec.get('pre_tokenizer') or {}).get('type')} pre-tokenizer",
            "SentencePiece-style tokenizers are not supported yet: export with --format hf",
        )
    pre, ignore_merges = _PRE_TOKENIZERS.get(tuple(steps), ("default", False))
    if pre == "default":
        warnings.append(
            "llama.cpp knows no pre-tokenizer like this tokenizer.json's; wrote 'default', so llama.cpp may "
            "split some text differently from transformers"
        )
    elif bool(model.get("ignore_merges", False)) != ignore_merges:
        warnings.append(f"tokenizer.json ignore_merges={model.get('ignore_merges')} but llama.cpp's {pre!r} differs")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        warnings.append(f"llama.cpp ignores the tokenizer's {normalizer} normalizer")

    by_id: dict[int, tuple[str, int]] = {}
    for text, i in (model.get("vocab") or {}).items():
        by_id[int(i)] = (text, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    if not by_id or max(by_id) >= n_rows:
        raise CosmicBakeError(
            f"the tokenizer has ids up to {max(by_id, default=-1)} but the embedding has {n_rows} rows",
            "use the tokenizer that belongs to this model",
        )
    tokens, types = [], []
    for i in range(n_rows):  # rows past the tokenizer (padded vocab) become unused placeholder tokens
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    if len(set(tokens)) != len(tokens):
        dup = next(t for t in tokens if tokens.count(t) > 1)
        raise CosmicBakeError(f"the tokenizer maps {dup!r} to two ids, which llama.cpp refuses", "fix tokenizer.json")
    with _quiet_gguf():
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_rows)
    if not special.merges:
        raise CosmicBakeError(f"{path.name} has no BPE merges", "re-download the tokenizer")
    if special.chat_template is None:
        warnings.append("the model has no chat template; llama.cpp chat front ends will fall back to their own")
    name = _model_name(name or folder.resolve().name, spec.get("added_tokens") or [], warnings)
    return Vocab(tokens, types, pre, special, name)


_PHI3_NAME = re.compile(r"(phi)-?(3)", re.IGNORECASE)
_PHI3_KEEP = {"<unk>", "<s>", "<|endoftext|>"}  # the special tokens llama.cpp's Phi-3 rule leaves unstripped


def _model_name(name: str, added: list[Mapping[str, Any]], warnings: list[str]) -> str:
    """``general.name``: ``name``, adjusted so llama.cpp strips whitespace exactly where HF does.

    llama.cpp (llama-vocab.cpp) gives every special token of a model whose *name* contains "phi3" or
    "phi-3" the rstrip attribute (whitespace after it is dropped), as Phi-3's tokenizer.json declares;
    no GGUF key says so. The name must therefore contain that string exactly when tokenizer.json's
    rstrip flags follow that rule, or llama.cpp tokenizes chat text differently from transformers.
    """
    specials = [t for t in added if t.get("special")]
    phi3_rule = any(t.get("rstrip") for t in specials) and all(
        bool(t.get("rstrip")) == (t.get("content") not in _PHI3_KEEP) for t in specials
    )
    if _PHI3_NAME.search(name) and not phi3_rule:
        name = _PHI3_NAME.sub(r"\1_\2", name)
    elif phi3_rule and not _PHI3_NAME.search(name):
        name = f"{name}-phi3"
    elif not phi3_rule and any(t.get("rstrip") or t.get("lstrip") for t in added):
        warnings.append(
            "llama.cpp ignores the tokenizer's lstrip/rstrip flags: whitespace next to special tokens may "
            "split differently"
        )
    return name


def _pre_tokenizer_steps(pre: Mapping[str, Any] | None) -> list[tuple] | None:
    """tokenizer.json's pre-tokenizer as comparable steps, or None for a kind llama.cpp cannot mirror."""
    if not pre:
        return []
    kind = pre.get("type")
    if kind == "Sequence":
        steps: list[tuple] = []
        for sub in pre.get("pretokenizers") or []:
            got = _pre_tokenizer_steps(sub)
            if got is None:
                return None
            steps.extend(got)
        return steps
    if kind == "ByteLevel":
        step = ("bytelevel", bool(pre.get("use_regex", True)))
        return [(*step, "add_prefix_space")] if pre.get("add_prefix_space", False) else [step]
    if kind == "Digits":
        return [("digits", bool(pre.get("individual_digits", False)))]
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        regex = pattern.get("Regex", re.escape(pattern.get("String", "")))
        if pre.get("behavior") != "Isolated" or pre.get("invert", False):
            return [("split-other", regex, pre.get("behavior"))]
        return [("split", regex)]
    return [(str(kind),)]
