"""Chat formatting, left-padded batches and the post-instruction positions.

Prompts go through the model's own chat template (its default system prompt included), or through
an override: a Jinja chat template, or a plain format string with ``{instruction}`` for base
models and for reproducing published runs. The candidate positions are the tokens the template
puts after the user's text (for ChatML ``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``,
``\\n``); they are found by rendering a sentinel instruction, never from a table of model names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cosmic_bake.errors import CosmicBakeError, first_line

_SENTINEL = "Sentinel instruction for locating the template suffix."


def read_template_option(value: str | None) -> str | None:
    """``--chat-template FILE|STRING``: a file's text, or the string with ``\\n`` escapes decoded."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if "\n" not in value and len(value) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    if "\n" not in value and "\\n" in value:
        return value.encode("utf-8").decode("unicode_escape")
    return value


MIN_SHARED = 2  # shared prefix tokens worth a custom attention mask


def shared_prefix_length(rows: list[list[int]], keep: int) -> int:
    """How many leading tokens every row shares, leaving at least ``keep`` + 1 tokens of each its own
    (the candidate positions, the last ``keep`` tokens, must lie in each prompt's own part)."""
    limit = min(len(row) for row in rows) - keep - 1
    m = 0
    while m < limit and all(row[m] == rows[0][m] for row in rows):
        m += 1
    return max(m, 0)


def _is_jinja(template: str) -> bool:
    return "{{" in template or "{%" in template


@dataclass
class ChatFormat:
    """Turns instructions into model inputs the same way every time.

    ``template`` overrides the tokenizer's chat template: Jinja if it contains ``{{`` or ``{%``,
    else a format string in which ``{instruction}`` (and optionally ``{system}``) is replaced.
    """

    tokenizer: object
    template: str | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.template is not None and not _is_jinja(self.template) and "{instruction}" not in self.template:
            raise CosmicBakeError(
                "--chat-template is neither a Jinja template nor a format string with {instruction}",
                "pass a Jinja template file, or a string like '<|user|>{instruction}<|assistant|>'",
            )
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            raise CosmicBakeError(
                "the tokenizer has no chat template (a base model?)",
                "pass --chat-template FILE|STRING, e.g. 'User: {instruction}\\nAssistant:'",
            )
        self.suffix_ids = self._suffix_ids()

    @property
    def uses_chat_template(self) -> bool:
        return self.template is None or _is_jinja(self.template)

    def render(self, instruction: str) -> str:
        """The full prompt text for one instruction, ending where the assistant starts."""
        if not self.uses_chat_template:
            return self.template.replace("{system}", self.system_prompt or "").replace("{instruction}", instruction)
        messages = [{"role": "user", "content": instruction}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # noqa: BLE001 - jinja errors become one line
            raise CosmicBakeError(
                f"the chat template failed to render: {first_line(err)}",
                "check --chat-template (or the model's template) and --system-prompt",
            ) from err

    def encode(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask`` for a batch of instructions."""
        texts = [self.render(i) for i in instructions]
        # Chat templates already write the special tokens they need (BOS included); adding
        # them again would double BOS. Plain format strings get the tokenizer's usual specials.
        batch = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not self.uses_chat_template)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def encode_packed(
        self, instructions: list[str], share_prefix: bool = False, window: int | None = None
    ) -> dict[str, torch.Tensor]:
        """All instructions in one row, no padding: ``input_ids``, ``position_ids`` and ``ends``.

        Positions restart at 0 for each prompt; transformers then builds a block-diagonal causal
        mask (its packed-sequence support), so each prompt attends only to itself. Padding wastes a
        third of the compute on short prompt sets; packing removes it. ``ends`` holds the index
        of each prompt's last token in the row.

        ``share_prefix``: the token prefix every prompt starts with (the template header and its
        system prompt: half the tokens of SmolLM2's short prompts) is written once at the start of
        the row, and each prompt's own tokens follow with their positions continuing from it.
        ``prefix_segments`` (``[1, T]``: -1 for the prefix, else the prompt's index) gives the mask
        :mod:`cosmic_bake.model.forward` builds, which lets each prompt see the shared prefix and
        itself, causally: the same attention as its own copy of the prefix,
        and per-token edits act on the prefix as they would on every copy. Used when at least
        :data:`MIN_SHARED` tokens are shared by two or more prompts, and no prompt is longer than
        the model's sliding attention ``window`` (the one mask serves every layer, so a window
        must not cut anything).
        """
        texts = [self.render(i) for i in instructions]
        rows = self.tokenizer(texts, add_special_tokens=not self.uses_chat_template)["input_ids"]
        for k, row in enumerate(rows):
            if list(row[-len(self.suffix_ids) :]) != self.suffix_ids:
                self.check_suffix(torch.tensor([row]), first_row=k)
        fits = window is None or max(len(row) for row in rows) <= window
        m = shared_prefix_length(rows, len(self.suffix_ids)) if share_prefix and fits and len(rows) > 1 else 0
        m = m if m >= MIN_SHARED else 0
        rests = [row[m:] for row in rows]  # m = 0: every prompt whole, positions restarting at 0
        ids = torch.tensor(list(rows[0][:m]) + [t for rest in rests for t in rest]).unsqueeze(0)
        positions = torch.cat([torch.arange(m), *(torch.arange(m, len(row)) for row in rows)]).unsqueeze(0)
        ends = m + torch.tensor([len(rest) for rest in rests]).cumsum(0) - 1
        batch = {"input_ids": ids, "position_ids": positions, "ends": ends}
        if m:
            # which prompt each token belongs to (-1: the shared prefix); the mask is built from it where the pass runs
            batch["prefix_segments"] = torch.cat(
                [torch.full((m,), -1), *(torch.full((len(r),), k) for k, r in enumerate(rests))]
            ).unsqueeze(0)
        return batch

    def _suffix_ids(self) -> list[int]:
        text = self.render(_SENTINEL)
        end = text.rfind(_SENTINEL)
        if end < 0:
            raise CosmicBakeError(
                "the chat template does not include the user's message",
                "check --chat-template: it must place the instruction in the prompt",
            )
        end += len(_SENTINEL)
        enc = self.tokenizer(text, add_special_tokens=not self.uses_chat_template, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start = next((k for k, (a, _b) in enumerate(offsets) if a >= end), len(ids))
        suffix = ids[start:]
        if not suffix:
            raise CosmicBakeError(
                "the chat template puts no tokens after the user's message",
                "use a template that ends with the assistant header (add_generation_prompt)",
            )
        return list(suffix)

    @property
    def n_positions(self) -> int:
        """P: how many post-instruction tokens there are; candidates use positions ``-P..-1``."""
        return len(self.suffix_ids)

    def suffix_tokens(self) -> list[str]:
        """The post-instruction tokens as text, for plot labels."""
        return [self.tokenizer.decode([t]) for t in self.suffix_ids]

    def check_suffix(self, input_ids: torch.Tensor) -> None:
        """Every row must end with the same post-instruction tokens, or positions mean nothing."""
        want = torch.tensor(self.suffix_ids)
        bad = [k for k in range(input_ids.shape[0]) if not torch.equal(input_ids[k, -len(want) :], want)]
        if bad:
            raise CosmicBakeError(
                f"{len(bad)} prompt(s) do not end with the template's post-instruction tokens (first: row {bad[0]})",
                "the instruction merges with the template suffix; strip trailing spaces or pass --chat-template",
            )
