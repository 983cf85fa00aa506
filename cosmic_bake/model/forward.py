"""Batched forward passes that record only what selection needs, and run only the layers it needs.

Three savings over running the whole model each time, all exact:

* ``stop_after=j``: the pass ends at the input of block ``j + 1`` (after that block's
  intervention hooks have run, so in-place edits of ``o_j`` are seen), so a score that reads
  block outputs up to layer ``j`` pays neither for the rest of the model nor for the LM head.
* ``replay``: layers before ``start`` return their recorded baseline outputs instead of being
  computed; an intervention that first acts at the input of block ``start`` cannot change them.
* The logits are computed for the last position only (``logits_to_keep=1``), and not at all
  when nobody reads them.

A packed row may also be stacked (:func:`stack_rows`): K copies of it, one per candidate, each
edited by its own row of a stacked intervention. Rows never see each other, so this scores K
candidates in one pass with the results of K passes; on a CPU the larger matrix products run
faster per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from cosmic_bake.model.architecture import Architecture
from cosmic_bake.model.devices import input_device, to_cpu, to_device


class _PassThrough(nn.Module):
    """Stands in for a decoder layer: returns its input, or a recorded output when given one."""

    def __init__(self, original: nn.Module, recorded: torch.Tensor | None = None) -> None:
        super().__init__()
        self.recorded = recorded
        for attr in ("attention_type", "layer_idx", "is_sliding", "sliding_window"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # A copy (on the device the stream is on here): the next block's pre-hook edits its input in place.
        # One recorded row serves every stacked candidate row of the pass.
        if self.recorded is None:
            return hidden_states
        recorded = self.recorded.to(device=hidden_states.device, dtype=hidden_states.dtype)
        return recorded.expand(hidden_states.shape).clone()


@contextlib.contextmanager
def replayed_layers(arch: Architecture, replay: dict[int, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily replace the ``replay`` layers by pass-throughs returning recorded outputs."""
    saved = list(arch.layers)
    try:
        for j in replay or {}:
            arch.layers[j] = _PassThrough(saved[j], replay[j])
        yield
    finally:
        for j, layer in enumerate(saved):
            arch.layers[j] = layer


class _Stop(Exception):
    """Raised at the input of the first block nobody needs, to end a pass early."""


def _stop(_module, _args, _kwargs):
    raise _Stop


@dataclass
class Recorded:
    """What one forward pass recorded, all on the CPU (whatever devices the layers sit on).

    ``inputs`` are float64; the others keep the model's dtype (the math casts to float64).
    """

    inputs: torch.Tensor | None = None  # block inputs at the last P positions [B, L, P, d]
    full_inputs: list[torch.Tensor] = field(default_factory=list)  # block inputs, whole sequence
    outputs: torch.Tensor | None = None  # block outputs at the last token [B, k, d], k = len(layers)
    logits: torch.Tensor | None = None  # last-position logits [B, vocab]


def forward(
    model: nn.Module,
    arch: Architecture,
    batch: dict[str, torch.Tensor],
    *,
    input_positions: int = 0,
    keep_full_inputs: bool = False,
    output_layers: list[int] | None = None,
    logits: bool = False,
    stop_after: int | None = None,
    replay: dict[int, torch.Tensor] | None = None,
) -> Recorded:
    """Run one batch and record block inputs, block outputs and/or last-position logits.

    ``output_layers`` lists the ``j`` whose block output ``o_j`` is read at the last token; the
    last layer's output is read after the final norm (as ``hidden_states[L]`` is in
    transformers). Outputs are read after the forward ends, so in-place edits made later by
    intervention hooks at the next block's input are included, as in the reference code.
    """
    n = arch.n_layers
    ends = batch.get("ends")  # packed batches: index of each prompt's last token in the row
    inputs_for_model = _model_inputs(batch, arch, input_device(model))
    # Logits at the last position; for a packed row, at each prompt's end: the final norm's output
    # is cut to those rows (on whatever device it sits) and the head then reads all of them.
    keep = 1 if ends is None else 0
    rec = Recorded()
    inputs: list[torch.Tensor | None] = [None] * n
    outs: dict[int, torch.Tensor] = {}
    handles = []
    if stop_after is None and not logits and output_layers:
        stop_after = max(output_layers)
    if logits or keep_full_inputs:
        stop_after = None
    result = None
    with replayed_layers(arch, replay):
        try:
            if input_positions or keep_full_inputs:
                for j in range(n):

                    def pre(_m, args, kwargs, j=j):
                        # Copied to the CPU as they come: consecutive layers may sit on different devices.
                        x = args[0] if args else kwargs["hidden_states"]
                        inputs[j] = to_cpu(x) if keep_full_inputs else to_cpu(_tail(x, ends, input_positions)).double()

                    handles.append(arch.layers[j].register_forward_pre_hook(pre, with_kwargs=True))
            for j in output_layers or []:
                module = arch.final_norm if j == n - 1 else arch.layers[j]

                def post(_m, _a, output, j=j):
                    outs[j] = output[0] if isinstance(output, tuple) else output

                handles.append(module.register_forward_hook(post))
            if logits and ends is not None:

                def at_ends(_m, _a, output):
                    return output[:, ends.to(output.device), :]

                handles.append(arch.final_norm.register_forward_hook(at_ends))
            if stop_after is not None and stop_after + 1 < n:
                # Registered last, so the block's own intervention hooks have already run.
                handles.append(arch.layers[stop_after + 1].register_forward_pre_hook(_stop, with_kwargs=True))
            with torch.no_grad():
                if logits:
                    result = model(**inputs_for_model, use_cache=False, logits_to_keep=keep)
                else:
                    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
                    decoder(**inputs_for_model, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
    if input_positions:
        rec.inputs = torch.stack(inputs, dim=1) if not keep_full_inputs else None
    if keep_full_inputs:
        rec.full_inputs = inputs  # type: ignore[assignment]
    if output_layers:
        # Read now (after later in-place edits), each moved to the CPU before stacking.
        rec.outputs = torch.stack([to_cpu(_tail(outs[j], ends, 1)[:, 0, :]) for j in output_layers], dim=1)
    if logits:
        rec.logits = to_cpu(result.logits[:, -1, :] if ends is None else result.logits.flatten(0, 1))
    return rec


def _model_inputs(batch: dict[str, torch.Tensor], arch: Architecture, device: torch.device) -> dict[str, torch.Tensor]:
    """What the model takes, on ``device``: ``ends`` dropped; for a shared prefix, the additive
    ``[rows, 1, T, T]`` mask in the model's dtype (eager attention adds it; SDPA takes either),
    built on ``device`` from the ``[T]`` segments, once for all stacked rows."""
    inputs = to_device({k: v for k, v in batch.items() if k not in ("ends", "prefix_segments")}, device)
    segments = batch.get("prefix_segments")
    if segments is not None:
        seg = segments[0].to(device)
        n, dtype = seg.numel(), arch.embed.weight.dtype
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        allowed = causal & ((seg.unsqueeze(0) == -1) | (seg.unsqueeze(0) == seg.unsqueeze(1)))
        additive = torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        inputs["attention_mask"] = additive.expand(segments.shape[0], 1, n, n)
    return inputs


def stack_rows(batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """``k`` copies of a packed row (``ends`` kept): row ``c`` is scored under candidate ``c``'s edit.

    Records of such a pass come candidate-major: ``[k * n_prompts, ...]``.
    """
    if k == 1:
        return batch
    if "ends" not in batch or batch["input_ids"].shape[0] != 1:
        raise ValueError("only a packed row (one row with 'ends') can be stacked")
    return {key: v if key == "ends" else v.expand(k, *v.shape[1:]) for key, v in batch.items()}


def _tail(x: torch.Tensor, ends: torch.Tensor | None, count: int) -> torch.Tensor:
    """The last ``count`` positions of each prompt, ``[n_prompts, count, d]`` (``[rows * n_prompts, ...]``
    for stacked packed rows, row-major)."""
    if ends is None:
        return x[:, -count:, :]
    index = ends.to(x.device).unsqueeze(1) + torch.arange(1 - count, 1, device=x.device).unsqueeze(0)
    return x[:, index, :].flatten(0, 1)
