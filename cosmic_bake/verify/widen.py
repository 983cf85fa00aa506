"""Load a 16-bit checkpoint in float32 without holding both copies: verify's loader.

``from_pretrained(..., dtype=float32)`` on a bfloat16 checkpoint maps the file and widens every
tensor, and the mapped pages it read stay in the process until loading ends: 1.5x the float32
model at the peak (a 1-layer 8B-wide checkpoint: 7.5 GB for a 4.7 GB model). Verify holds one
model at a time to stay under 1.3x, so for a folder whose weights are all stored in one coarser
float type it loads that way instead:

1. the model as stored (``dtype`` = the stored type: transformers maps the file, nothing is copied
   or converted, so nothing is lost either);
2. an empty float32 model of the same config (``no_init_weights``: parameters are allocated but
   not touched, so not resident; buffers such as RoPE frequencies or Gemma 3's embedding scale are
   computed in float32, exactly as a float32 ``from_pretrained`` computes them);
3. each parameter copied across a chunk of rows at a time, and the stored copy's pages handed back
   to the kernel (``madvise(MADV_DONTNEED)``, only on pages of a file mapping, which the kernel
   re-reads from the file if they are ever touched again); copies transformers made itself (fused
   experts) are simply dropped.

The peak is the float32 model plus one chunk; the result equals ``load_model(spec, dtype="float32")``
(tests/test_verify_memory.py compares every parameter, buffer and logit).
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import gc
import mmap
import sys
from pathlib import Path

import torch

from cosmic_bake.export.safetensors_read import DTYPES

CHUNK_BYTES = 64 << 20  # float32 bytes widened at a time
_MADV_DONTNEED = 4
_FLOAT_CODES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def stored_float_dtype(folder: Path) -> torch.dtype | None:
    """The one float dtype every floating tensor of a safetensors folder is stored in, else None."""
    from cosmic_bake.export.safetensors_read import list_weights

    codes = {t.dtype for t in list_weights(folder).tensors.values() if DTYPES[t.dtype].is_floating_point}
    return _FLOAT_CODES.get(next(iter(codes))) if len(codes) == 1 else None


def load_widened(spec: str, dtype: str, placement=None):
    """``load_model(spec, dtype=dtype, placement=placement)``, widened from the stored type when that saves memory.

    Only a plain CPU load is widened here (see the module doc); a model placed on an accelerator
    or dispatched by accelerate (device map, memory budget, disk offload) loads as usual.
    """
    from cosmic_bake.model.devices import Placement, compute_device, resolve_dtype
    from cosmic_bake.model.loading import load_model, resolve

    placement = placement or Placement()
    device = compute_device(placement)
    target = resolve_dtype(dtype, device)
    source = resolve(spec)
    plain_cpu = not placement.dispatched and device.type == "cpu"
    if not plain_cpu or source.kind != "folder" or not sys.platform.startswith("linux"):
        return load_model(spec, dtype=dtype, placement=placement)
    stored = stored_float_dtype(source.path)
    if stored is None or stored.itemsize >= target.itemsize:
        return load_model(spec, dtype=dtype, placement=placement)
    lm = load_model(spec, dtype=stored, placement=placement)
    model, lm.model = lm.model, None
    lm.model = widen(model, target)
    lm.dtype = target
    return lm


def widen(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A ``dtype`` copy of ``model``, made parameter by parameter; ``model`` is emptied as it goes.

    Each parameter of ``model`` is left as an empty tensor once copied (so a copy transformers
    made while loading is freed at once), and its file-mapped pages are handed back to the kernel.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        wide = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    wide.requires_grad_(False).eval()
    persistent = set(model.state_dict())
    for name, buf in model.named_buffers():
        if name in persistent:
            wide.get_buffer(name).copy_(buf)
    for name, param in model.named_parameters():
        _copy_release(param.data, wide.get_parameter(name))
        param.data = torch.empty(0, dtype=param.dtype)
    if getattr(wide.config, "tie_word_embeddings", False):
        wide.tie_weights()
    gc.collect()
    return wide


@torch.no_grad()
def _copy_release(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[:] = src`` a chunk of rows at a time, handing ``src``'s mapped pages back after each chunk."""
    if src.shape != dst.shape:
        raise ValueError(f"widening: shape {tuple(src.shape)} != {tuple(dst.shape)}")
    flat_src = src.reshape(src.shape[0], -1) if src.ndim > 1 else src.reshape(1, -1)
    flat_dst = dst.view(flat_src.shape)
    row_bytes = max(1, flat_src.shape[1] * dst.element_size())
    step = max(1, CHUNK_BYTES // row_bytes)
    mapped = src.is_contiguous() and src.device.type == "cpu" and _file_mapped(*_span(src))
    for a in range(0, flat_src.shape[0], step):
        flat_dst[a : a + step].copy_(flat_src[a : a + step])
        if mapped:
            _release(*_span(flat_src[a : a + step]))


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _release(start: int, end: int) -> None:
    """Drop this process's pages in ``[start, end)`` of a file mapping (whole pages only)."""
    page = mmap.PAGESIZE
    a, b = -(-start // page) * page, end // page * page
    if b > a:
        _libc().madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.madvise.restype = ctypes.c_int
    return lib


def _file_mapped(start: int, end: int) -> bool:
    """Whether ``[start, end)`` lies inside one mapping of a file that is not writable shared memory."""
    ranges = _file_maps()
    i = bisect.bisect_right([r[0] for r in ranges], start) - 1
    return i >= 0 and ranges[i][0] <= start and end <= ranges[i][1]


def _file_maps() -> list[tuple[int, int]]:
    """``(start, end)`` of this process's private mappings of regular files, sorted (from /proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/") or parts[5].rstrip().endswith("(deleted)"):
                continue
            if parts[1][3] != "p":  # shared mappings: leave them alone
                continue
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out.append((a, b))
    out.sort()
    return out
