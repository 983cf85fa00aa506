"""Where a model runs: one device, or accelerate's big-model dispatch over GPUs, CPU and disk.

Users pick a device (``auto`` takes CUDA, then MPS, then the CPU) or hand the placement to
accelerate (``device_map`` auto / balanced / sequential / a JSON file, ``max_memory``,
``offload_folder``), the engine transformers' ``from_pretrained`` already drives. Nothing else in
cosmic_bake assumes one device: inputs go where the input embedding computes
(:func:`input_device`), hook tensors follow the tensor they edit, and captured activations are
moved to the CPU. Weights of offloaded modules live on the ``meta`` device between passes;
:func:`cpu_param` reads them through accelerate's own hook.

Everything here is a pure helper except :func:`from_pretrained_kwargs`, which creates the private
offload subfolder of one load.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cosmic_bake.errors import CosmicBakeError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Placement:
    """Where to load a model.

    ``device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` (the whole model on one device).
    ``device_map``: ``auto`` | ``balanced`` | ``balanced_low_0`` | ``sequential`` | a JSON file
    mapping module names to ``0``, ``"cuda:1"``, ``"cpu"`` or ``"disk"`` (accelerate's dispatch;
    ``device`` must then stay ``auto``). ``max_memory``: ``"0=70GiB,1=70GiB,cpu=200GiB"``.
    ``offload_folder``: where accelerate may write weights it offloads to disk (each load uses its
    own subfolder, removed when the model is freed). ``max_memory`` or ``offload_folder`` without
    ``device_map`` imply ``device_map="auto"``.
    """

    device: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None

    @property
    def dispatched(self) -> bool:
        """Whether accelerate places the model (a device map, a memory budget or an offload folder)."""
        return self.device_map is not None or self.max_memory is not None or self.offload_folder is not None


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA if present, else MPS, else CPU; a named device must exist (one-line error)."""
    if isinstance(name, torch.device):
        name = str(name)
    text = name.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise CosmicBakeError("device mps is not available on this machine", "use --device cpu (or auto)")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise CosmicBakeError(f"unknown device '{name}'", "use auto, cpu, cuda, cuda:N or mps")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(index_text)
        if index >= count:
            have = "no CUDA device" if count == 0 else f"CUDA devices 0..{count - 1}"
            raise CosmicBakeError(f"device {text} is not available ({have})", "use --device auto or cpu")
        return torch.device("cuda", index)
    raise CosmicBakeError(f"unknown device '{name}'", "use auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``, with a clear error for anything else (``auto``: :func:`resolve_dtype`)."""
    if name not in DTYPES:
        raise CosmicBakeError(f"unknown dtype '{name}'", f"use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU (float16 where CUDA lacks bf16), float32 on the CPU.

    Scores stay float64 whatever this is (means, pooled cosines and KL are accumulated in float64);
    the dtype only sets the precision of the activations themselves.
    """
    if isinstance(name, torch.dtype):
        return name
    if name != "auto":
        return parse_dtype(name)
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.bfloat16
    return torch.float32


def parse_max_memory(text: str | dict | None) -> dict[int | str, int] | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: 75161927680, 1: ..., "cpu": ...}`` (bytes, for accelerate).

    Keys: a GPU index (``0``, or ``cuda:0``), ``cpu`` or ``mps``; values: a size with a unit
    (``GiB``, ``GB``, ``MiB``, ``KB`` ...) or a number of bytes. Disk is unbounded (what does not
    fit goes there, into ``offload_folder``).
    """
    if text is None:
        return None
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            key, eq, value = part.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise CosmicBakeError(
                    f"--max-memory entry '{part}' is not DEVICE=SIZE", "write e.g. 0=70GiB,1=70GiB,cpu=200GiB"
                )
            items.append((key.strip(), value.strip()))
    if not items:
        raise CosmicBakeError("--max-memory is empty", "write e.g. 0=70GiB,cpu=200GiB")
    out: dict[int | str, int] = {}
    for key, value in items:
        name = _memory_key(key)
        out[name] = _memory_size(key, value)
    return out


def _memory_key(key) -> int | str:
    text = str(key).strip().lower()
    if text.startswith("cuda:"):
        text = text[5:]
    if text.isdigit():
        return int(text)
    if text in ("cpu", "mps"):
        return text
    if text == "disk":
        raise CosmicBakeError(
            "--max-memory takes no disk budget (disk is unbounded)", "drop disk=...; set --offload-folder"
        )
    raise CosmicBakeError(f"--max-memory device '{key}' is unknown", "use a GPU index (0, 1 ...), cpu or mps")


def _memory_size(key, value) -> int:
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    from accelerate.utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text)
    except ValueError:
        size = -1
    if size < 0:
        raise CosmicBakeError(f"--max-memory size '{value}' for {key} is not a size", "write e.g. 70GiB or 500MB")
    return size


def read_device_map(value: str | dict | None) -> str | dict | None:
    """A strategy name as it is, or a JSON file read into ``{module name: device}`` (checked)."""
    if value is None or isinstance(value, dict):
        return value
    if value in DEVICE_MAP_STRATEGIES:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise CosmicBakeError(
            f"--device-map '{value}' is neither a strategy nor a file",
            f"use {', '.join(DEVICE_MAP_STRATEGIES)} or FILE.json",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CosmicBakeError(f"could not read device map {path}: {err}", "write a JSON object") from err
    if not isinstance(data, dict) or not data:
        raise CosmicBakeError(
            f"device map {path} is not a JSON object of module: device", 'write {"model.layers.0": 0}'
        )
    out: dict[str, int | str] = {}
    for name, device in data.items():
        if isinstance(device, bool) or not isinstance(device, int | str):
            raise CosmicBakeError(f"device map {path}: '{name}' maps to {device!r}", 'use 0, "cuda:1", "cpu" or "disk"')
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        if isinstance(device, str) and device != "disk":
            try:
                torch.device(device)
            except RuntimeError as err:
                raise CosmicBakeError(
                    f"device map {path}: '{name}' maps to unknown device '{device}'", 'use 0, "cuda:1", "cpu" or "disk"'
                ) from err
        out[str(name)] = device
    return out


def compute_device(placement: Placement) -> torch.device:
    """The device that does the arithmetic: the chosen device, or for a device map the first GPU (else CPU).

    accelerate computes CPU- and disk-offloaded layers on the first GPU when there is one.
    """
    if not placement.dispatched:
        return resolve_device(placement.device)
    if isinstance(placement.device_map, str) and placement.device_map not in DEVICE_MAP_STRATEGIES:
        devices = list(read_device_map(placement.device_map).values())
        gpus = [d for d in devices if isinstance(d, int) or str(d).startswith(("cuda", "mps"))]
        return torch.device(gpus[0]) if gpus else torch.device("cpu")
    memory = parse_max_memory(placement.max_memory)
    if memory is not None and not any(isinstance(k, int) or k == "mps" for k in memory):
        return torch.device("cpu")
    return resolve_device("auto")


def from_pretrained_kwargs(placement: Placement | None) -> dict:
    """The ``device_map`` / ``max_memory`` / ``offload_folder`` arguments of ``from_pretrained``.

    The default placement on a machine without a GPU gives ``{}``: exactly the CPU load of before.
    A device map gets a private subfolder of ``offload_folder`` (removed when the model is freed),
    so two models loaded side by side (``verify``) never share offloaded files.
    """
    placement = placement or Placement()
    if not placement.dispatched:
        device = resolve_device(placement.device)
        return {} if device.type == "cpu" else {"device_map": str(device)}
    if placement.device.strip().lower() != "auto":
        raise CosmicBakeError(
            f"--device {placement.device} and --device-map cannot be combined",
            "leave --device at auto and restrict the devices with --max-memory (e.g. cpu=200GiB)",
        )
    kwargs: dict = {"device_map": read_device_map(placement.device_map or "auto")}
    memory = parse_max_memory(placement.max_memory)
    if memory is not None:
        kwargs["max_memory"] = memory
    if placement.offload_folder is not None:
        root = Path(placement.offload_folder).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        kwargs["offload_folder"] = tempfile.mkdtemp(prefix="cosmic-bake-offload-", dir=root)
    return kwargs


def remove_with(model: torch.nn.Module, folder: str | None) -> None:
    """Delete ``folder`` (a private offload subfolder) when ``model`` is garbage collected or at exit."""
    if folder is not None:
        weakref.finalize(model, shutil.rmtree, folder, ignore_errors=True)


def _hook_device(module: torch.nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return None


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device if it dispatched it, else its first real tensor's."""
    device = _hook_device(module)
    if device is not None:
        return device
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids must go: the device the input embedding computes on (never ``model.device``)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = _hook_device(embed) if embed is not None else None
    if device is None:
        device = _hook_device(model)
    if device is None and embed is not None:
        device = module_device(embed)
    return device or torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with every tensor on ``device`` (others unchanged); the same dict when nothing moves."""
    if all(not isinstance(v, torch.Tensor) or v.device == device for v in batch.values()):
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def is_offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s own weights off-device between passes (on ``meta``)."""
    return any(t.device.type == "meta" for t in module.parameters(recurse=False))


@contextlib.contextmanager
def loaded_on_cpu(module: torch.nn.Module) -> Iterator[None]:
    """Within the block an offloaded ``module`` holds its weights on the CPU and runs there; others are untouched."""
    if not is_offloaded(module):
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module, torch.device("cpu")):
        yield


def cpu_param(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """Parameter ``name`` of ``module`` as a CPU tensor, read from accelerate's offload map if it is on ``meta``."""
    t = getattr(module, name)
    if t.device.type != "meta":
        return t.detach().to("cpu")
    with loaded_on_cpu(module):
        loaded = getattr(module, name)
        if loaded.device.type == "meta":
            raise CosmicBakeError(
                f"{type(module).__name__}.{name} is offloaded but accelerate could not load it",
                "load the model without --device-map",
            )
        return loaded.detach().to("cpu", copy=True)


def to_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of an activation (never the same storage as ``t``), in ``t``'s dtype."""
    return t.detach().to("cpu", copy=True)
