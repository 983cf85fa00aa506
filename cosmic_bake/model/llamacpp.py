"""Run a GGUF file in llama.cpp (through llama-cpp-python) on token ids we choose.

Verification and evaluation feed llama.cpp the token ids of the transformers tokenizer, so a
difference in logits can only come from the weights and the runtime, never from tokenization.
Two uses:

* :meth:`LlamaCppModel.logits`: next-token logits at every position of one sequence (verify).
* :meth:`LlamaCppModel.greedy`: greedy continuation until an end-of-generation token (eval),
  reading only the last position's logits, so the output head runs once per step.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import numpy as np

from cosmic_bake.errors import CosmicBakeError, first_line

GGML_F32 = 0  # ggml_type of float32 (KV cache type)
_LOAD_LOCK = threading.Lock()


@functools.cache
def has_amx() -> bool:
    """Whether this llama.cpp build runs Intel AMX kernels (``AMX_INT8 = 1`` in its system info; asked once)."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode("utf-8", "replace")


def open_llama(path: str | os.PathLike, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)``, safe on CPUs with Intel AMX.

    llama.cpp's AMX weight buffers crash (SIGSEGV in ``ggml_backend_amx_mul_mat``) or compute
    garbage on Q4_0 / Q4_1 / K-quant files (upstream issues 20824 and PR 16315), and the PyPI build
    of llama-cpp-python enables AMX wherever the compiling CPU has it. On such a build the model is
    loaded with ``use_extra_bufts = false``: weights stay in plain CPU buffers and run through the
    ordinary CPU kernels. ``Llama`` has no argument for that field, so its default-parameters
    function is swapped for the duration of the load (under a lock: the swap is process-wide).
    Elsewhere this is exactly ``llama_cpp.Llama``.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as capi

    if not has_amx():
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    default = capi.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    with _LOAD_LOCK:
        capi.llama_model_default_params = without_extra_buffers
        try:
            return llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            capi.llama_model_default_params = default


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads() or (os.cpu_count() or 1))


class LlamaCppModel:
    """One llama.cpp model and context; sequences are evaluated one at a time from an empty cache."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int = 2048,
        all_logits: bool = False,
        threads: int | None = None,
        lora: Path | None = None,
    ):
        import llama_cpp

        from cosmic_bake.export.gguf_io import check_magic

        # A foreign file fails here with a clear line; llama.cpp parses the header itself (parsing
        # it twice costs seconds on a 150k-token vocabulary), and a truncated file fails below.
        path = check_magic(path)
        try:
            self.llm = open_llama(
                path,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=min(n_ctx, 512),
                logits_all=all_logits,
                n_threads=threads or _threads(),
                verbose=False,
                # Verification keeps the KV cache in f32: llama.cpp's default f16 cache alone moves
                # logits by ~1e-6 KL, which would hide weight errors of that size.
                **({"type_k": GGML_F32, "type_v": GGML_F32} if all_logits else {}),
                **({"lora_path": str(lora)} if lora is not None else {}),
            )
        except Exception as err:  # noqa: BLE001 - llama.cpp reports load failures as ValueError
            raise CosmicBakeError(
                f"llama.cpp could not load {path}: {first_line(err)}",
                "check that this llama.cpp build supports the model's architecture and the file is complete",
            ) from err
        self.path = path
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def _run(self, ids: list[int]) -> None:
        if len(ids) > self.n_ctx:
            raise CosmicBakeError(
                f"a prompt of {len(ids)} tokens does not fit llama.cpp's context of {self.n_ctx}",
                "use shorter prompts",
            )
        self.llm.reset()
        self.llm.eval(ids)

    def logits(self, ids: list[int]) -> np.ndarray:
        """``[len(ids), vocab]`` float32 logits for every position (needs ``all_logits=True``)."""
        self._run(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def _last(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def last_logits(self, ids: list[int]) -> np.ndarray:
        """``[vocab]`` float32 logits after the last token."""
        self._run(list(ids))
        return self._last()

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def greedy(
        self, ids: list[int], max_new_tokens: int, stop_ids: set[int] | frozenset[int] = frozenset()
    ) -> list[int]:
        """Greedy new tokens after ``ids``, stopping at an end-of-generation token (not returned)."""
        self._run(list(ids))
        out: list[int] = []
        for _ in range(max_new_tokens):
            if self.llm.n_tokens >= self.n_ctx:
                break
            token = int(np.argmax(self._last()))
            if token in stop_ids or self.is_eog(token):
                break
            out.append(token)
            self.llm.eval([token])
        return out

    def close(self) -> None:
        self.llm.close()
