"""Verify's passes, one model in memory at a time: the original's logits wait on disk for the baked model's.

Holding the original and the baked model together costs two models (plus both models' logits):
8 GB for a 0.5B model in float32. Here the original runs first, under its hook (and plain, for
the relative gate); the next-token logits at every real position go to an unnamed temporary file
(:class:`LogitSpool`, one entry per prompt, in the model's own dtype, so nothing is rounded);
the original is then freed and the baked model loaded, and each of its prompts is compared with
the spooled rows read back. Comparisons run in row chunks (:data:`CHUNK_VALUES` values at a time,
float64 arithmetic), so no full ``[positions, vocab]`` float64 tensor is ever made.

What stays in memory besides one model: one batch's logits from the forward pass, one prompt's
rows read back, and the chunk temporaries. The spool takes ``positions x vocab x dtype size``
bytes of temporary disk (32 prompts of Qwen2.5 in float32: about 0.8 GB), gone when it is closed.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch

from cosmic_bake.model.devices import input_device, to_device
from cosmic_bake.model.hooks import intervene

# float64 values per comparison chunk: a few temporaries of this size (16 MiB each) at a time.
CHUNK_VALUES = 1 << 21


class LogitSpool:
    """Logit rows kept on disk in order (an unnamed temporary file, deleted when closed)."""

    def __init__(self) -> None:
        self._fh = tempfile.TemporaryFile(prefix="cosmic-bake-logits-")
        self._index: list[tuple[int, tuple[int, ...], torch.dtype]] = []
        self._end = 0

    def __len__(self) -> int:
        return len(self._index)

    def append(self, rows: torch.Tensor) -> None:
        """Store ``rows`` (any device, any dtype) as the next entry."""
        rows = rows.detach().to("cpu").contiguous()
        self._fh.seek(self._end)
        self._fh.write(rows.view(torch.uint8).numpy().data if rows.numel() else b"")
        self._index.append((self._end, tuple(rows.shape), rows.dtype))
        self._end = self._fh.tell()

    def __getitem__(self, i: int) -> torch.Tensor:
        """Entry ``i`` as a fresh CPU tensor of the dtype it was stored in."""
        offset, shape, dtype = self._index[i]
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            buf = out.view(torch.uint8).numpy()
            self._fh.seek(offset)
            if self._fh.readinto(buf) != buf.nbytes:
                raise OSError("the temporary logits file was truncated")
        return out

    def close(self) -> None:
        self._fh.close()


@dataclass
class Totals:
    """Running sums over prompts, so the report never holds all logits at once."""

    positions: int = 0
    max_abs: float = 0.0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    agree: int = 0

    def add(self, hooked: torch.Tensor, baked: torch.Tensor) -> None:
        """``hooked`` and ``baked`` are ``[n, vocab]`` logits at real positions (compared on the CPU)."""
        rows = max(1, CHUNK_VALUES // max(1, hooked.shape[-1]))
        for s in range(0, hooked.shape[0], rows):
            self._add(hooked[s : s + rows].to("cpu"), baked[s : s + rows].to("cpu"))

    def _add(self, hooked: torch.Tensor, baked: torch.Tensor) -> None:
        h, b = hooked.double(), baked.double()
        logp_h, logp_b = torch.log_softmax(h, dim=-1), torch.log_softmax(b, dim=-1)
        kl = (logp_h.exp() * (logp_h - logp_b)).sum(-1).clamp_min(0.0)
        self.positions += h.shape[0]
        self.max_abs = max(self.max_abs, float((h - b).abs().max()))
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.agree += int((h.argmax(-1) == b.argmax(-1)).sum())

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / max(1, self.positions)

    @property
    def top1(self) -> float:
        return self.agree / max(1, self.positions)

    def record(self) -> dict:
        return {
            "max_abs_logit_diff": self.max_abs,
            "mean_kl": self.mean_kl,
            "max_kl": self.kl_max,
            "top1_agreement": self.top1,
        }


@dataclass
class OriginalPass:
    """What the original model leaves for the comparison once it is gone."""

    batches: list[dict[str, torch.Tensor]]  # the encoded batches; the baked model sees the same ids
    vocab: int
    dtype: str  # the dtype the original computed in
    hooked: LogitSpool  # per prompt: [real positions, vocab] under the hook
    plain: LogitSpool | None  # per prompt: the original without the hook (GGUF runtime floor)
    unedited: Totals | None  # KL(hook || original without it): the transformers relative gate
    seconds: float

    @property
    def n_prompts(self) -> int:
        return len(self.hooked)

    def prompt_rows(self) -> list[tuple[int, dict[str, torch.Tensor], int]]:
        """``(prompt index, its batch, its row in the batch)`` for every prompt, in order."""
        out, k = [], 0
        for batch in self.batches:
            for row in range(batch["input_ids"].shape[0]):
                out.append((k, batch, row))
                k += 1
        return out

    def close(self) -> None:
        self.hooked.close()
        if self.plain is not None:
            self.plain.close()


def _real_rows(logits: torch.Tensor, mask: torch.Tensor, row: int) -> torch.Tensor:
    """Row ``row``'s logits at its real (non-pad) positions, ``[n, vocab]``."""
    return logits[row][mask[row].to(logits.device)]


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for ``batch``; the inputs go where the model's embedding computes."""
    return model(**to_device(batch, input_device(model)), use_cache=False).logits


@torch.no_grad()
def record_original(
    model,
    arch,
    hook,
    prompts: list[str],
    fmt,
    batch_size: int,
    *,
    measure_unedited: bool = True,
    keep_plain: bool = False,
) -> OriginalPass:
    """Run the original under ``hook`` (an Intervention, or None for none) and spool its logits.

    ``measure_unedited``: also run it without the hook and measure ``KL(hook || plain)`` now (the
    relative gate's reference in transformers). ``keep_plain``: spool the plain logits too (the
    llama.cpp comparisons need them after the model is gone). Without a hook, plain is hooked.
    """
    t0 = time.perf_counter()
    ivs = () if hook is None else (hook,)
    hooked, plain = LogitSpool(), (LogitSpool() if keep_plain and ivs else None)
    unedited = Totals() if measure_unedited else None
    batches = []
    try:  # a failed attempt (out of memory: retried with a smaller batch) leaves no temporary file
        for start in range(0, len(prompts), batch_size):
            batch = fmt.encode(prompts[start : start + batch_size])
            batches.append(batch)
            mask = batch["attention_mask"].bool()
            first = len(hooked)
            with intervene(arch, *ivs):
                logits = _logits(model, batch)
            for row in range(mask.shape[0]):
                hooked.append(_real_rows(logits, mask, row))
            del logits
            if unedited is None and plain is None:
                continue
            logits = _logits(model, batch) if ivs else None
            for row in range(mask.shape[0]):
                rows = _real_rows(logits, mask, row) if logits is not None else hooked[first + row]
                if unedited is not None:
                    unedited.add(hooked[first + row], rows)
                if plain is not None:
                    plain.append(rows)
            del logits
    except BaseException:
        hooked.close()
        if plain is not None:
            plain.close()
        raise
    vocab = model.get_output_embeddings().weight.shape[0]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return OriginalPass(batches, vocab, dtype, hooked, plain, unedited, time.perf_counter() - t0)


@torch.no_grad()
def compare_transformers(rec: OriginalPass, baked_model, rows: int | None = None) -> tuple[Totals, float]:
    """``(totals, seconds)`` of ``KL(hook || baked)`` over the recorded prompts.

    ``rows``: run at most this many rows of each recorded batch at once (None: the whole batch).
    The rows keep the batch's padding, so the baked model sees exactly the recorded inputs; a
    smaller ``rows`` is what out-of-memory back-off retries with.
    """
    t0 = time.perf_counter()
    totals = Totals()
    k = 0
    for batch in rec.batches:
        n = batch["input_ids"].shape[0]
        step = n if rows is None else max(1, rows)
        for s in range(0, n, step):
            part = {key: v[s : s + step] for key, v in batch.items()}
            mask = part["attention_mask"].bool()
            logits = _logits(baked_model, part)
            for row in range(mask.shape[0]):
                totals.add(rec.hooked[k], _real_rows(logits, mask, row))
                k += 1
            del logits
    return totals, time.perf_counter() - t0


def llama_tokens(rec: OriginalPass) -> list[list[int]]:
    """Each prompt's token ids (unpadded), as llama.cpp is given them."""
    rows = rec.prompt_rows()
    return [batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() for _, batch, row in rows]


def compare_llamacpp(rec: OriginalPass, model, *spools: LogitSpool) -> list[Totals]:
    """``KL(spooled || llama.cpp model)`` over the recorded prompts, one :class:`Totals` per spool.

    llama.cpp computes each prompt once, however many recorded logits it is compared with.
    """
    totals = [Totals() for _ in spools]
    for k, tokens in enumerate(llama_tokens(rec)):
        logits = torch.from_numpy(model.logits(tokens))
        for t, spool in zip(totals, spools):
            t.add(spool[k], logits)
    return totals
