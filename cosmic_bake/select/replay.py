"""The recorded input of one block at a time, for replaying the layers an intervention cannot change.

An intervention that first acts at the input of block ``l`` (``add`` / ``affine`` at ``l``) leaves
blocks ``0 .. l-1`` as they were, so scoring skips them: block ``l-1`` returns the recorded
input of block ``l`` (:func:`cosmic_bake.model.forward.replayed_layers`), and an earlier block
returns its recorded output if a score reads it (an eval layer), else passes its input through.
So what is kept is the input of the current block and the outputs of the eval layers below it:
scoring visits the candidates layer by layer (all positions of layer ``l``, then ``l + 1``) and
:class:`BlockInputs` moves its record forward one block at a time, running just that block on
the input it holds.

Memory: ``1 + len(eval layers)`` blocks' activations for every prompt of the set (``tokens x
d_model`` each, in the model's dtype), instead of every layer's (``n_layers`` of them). Compute:
one extra pass of each replayed set, one block per layer, over the whole scoring.
"""

from __future__ import annotations

import torch

from cosmic_bake.model.devices import to_cpu
from cosmic_bake.model.forward import forward


class BlockInputs:
    """Per batch of a prompt set: the (unedited) input of block :attr:`layer`, whole sequences."""

    def __init__(self, model, arch, encoded: list[dict[str, torch.Tensor]], read_layers=()) -> None:
        self.model, self.arch, self.encoded = model, arch, encoded
        self.read_layers = set(read_layers)  # blocks whose outputs a score reads: kept once passed
        self.layer = -1
        self.inputs: list[torch.Tensor] = []
        self.outputs: dict[int, list[torch.Tensor]] = {}  # eval layer -> its block output, per batch
        self.peak_bytes = 0  # most bytes held at once

    @property
    def nbytes(self) -> int:
        held = {id(t): t for t in [*self.inputs, *(t for ts in self.outputs.values() for t in ts)]}
        return sum(t.numel() * t.element_size() for t in held.values())

    def at(self, layer: int) -> list[torch.Tensor]:
        """The input of block ``layer`` for every batch (moving forward from the current layer)."""
        if layer < self.layer:  # scoring goes layer by layer; going back starts over from the embeddings
            self.layer, self.inputs, self.outputs = -1, [], {}
        while self.layer < layer:
            self._advance()
        return self.inputs

    def replay(self, layer: int, b: int) -> dict[int, torch.Tensor | None] | None:
        """The ``replay`` argument of :func:`~cosmic_bake.model.forward.forward` for batch ``b``:
        blocks before ``layer - 1`` pass through, block ``layer - 1`` returns block ``layer``'s input."""
        if layer <= 0:
            return None
        inputs = self.at(layer)
        replay: dict[int, torch.Tensor | None] = {j: self._output(j, b) for j in range(layer - 1)}
        replay[layer - 1] = inputs[b]
        return replay

    def _output(self, j: int, b: int) -> torch.Tensor | None:
        return self.outputs[j][b] if j in self.outputs else None

    def _advance(self) -> None:
        target = self.layer + 1
        for b, batch in enumerate(self.encoded):
            replay = None if target <= 1 else {j: self._output(j, b) for j in range(target - 2)}
            if replay is not None:
                replay[target - 2] = self.inputs[b]
            captured = self._capture(batch, target, replay)
            self.peak_bytes = max(self.peak_bytes, self.nbytes + captured.numel() * captured.element_size())
            if target == 0:
                self.inputs.append(captured)
            else:
                self.inputs[b] = captured
        if target - 1 in self.read_layers:  # the input of block target is the output of block target - 1
            self.outputs[target - 1] = list(self.inputs)
        self.layer = target

    def _capture(self, batch: dict[str, torch.Tensor], target: int, replay) -> torch.Tensor:
        """Run up to the input of block ``target`` (only block ``target - 1`` computed) and take it."""
        seen: list[torch.Tensor] = []

        def grab(_module, args, kwargs):
            # Kept on the CPU, as forward's own records are (consecutive layers may sit on different devices).
            seen.append(to_cpu(args[0] if args else kwargs["hidden_states"]))

        # Registered before forward() registers its stop, so this runs first.
        handle = self.arch.layers[target].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            forward(self.model, self.arch, batch, stop_after=target - 1, replay=replay)
        finally:
            handle.remove()
        return seen[0]
