"""Load a causal LM and its tokenizer from a Hub id, a local folder, a GGUF file or a builtin name.

GGUF files go through transformers' own GGUF reader (``gguf_file=``), which dequantizes. It then
marks the model as quantized and refuses to save it, so we rebuild a plain model from its config
and state dict: everything downstream (hooks, baking, saving) sees an ordinary float model.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cosmic_bake.errors import CosmicBakeError, first_line
from cosmic_bake.model.batching import is_out_of_memory
from cosmic_bake.model.builtin import cache_dir, fetch_builtin
from cosmic_bake.model.devices import (
    DTYPES,
    Placement,
    compute_device,
    from_pretrained_kwargs,
    remove_with,
    resolve_dtype,
)


@dataclass
class ModelSource:
    """Where a model comes from; ``kind`` is ``gguf``, ``folder`` or ``hub``."""

    spec: str
    kind: str
    path: Path | None = None  # the GGUF file or the folder
    hub_id: str | None = None
    revision: str | None = None
    extra_folder: Path | None = None  # the dequantized cache of a GGUF source, once made

    @property
    def files(self) -> list[Path]:
        """The local files that define the model (for hashing into manifests)."""
        if self.kind == "gguf" and self.path is not None:
            return [self.path]
        if self.path is not None and self.path.is_dir():
            keep = (".safetensors", ".json", ".bin", ".model", ".jinja", ".txt")
            return sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix in keep)
        return []


@dataclass
class LoadedModel:
    """A model ready for hooks, with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)


def resolve(spec: str | os.PathLike) -> ModelSource:
    """Decide what ``spec`` names, without loading anything."""
    text = str(spec)
    if text.startswith("builtin:"):
        path = fetch_builtin(text.split(":", 1)[1])
        return ModelSource(text, "gguf", path=path)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise CosmicBakeError(
                    f"{path} is a file but not a .gguf model",
                    "pass a .gguf file, a transformers model folder, or a Hub id",
                )
            return ModelSource(text, "gguf", path=path)
        if not (path / "config.json").is_file():
            raise CosmicBakeError(f"{path} has no config.json", "pass a transformers model folder or a .gguf file")
        return ModelSource(text, "folder", path=path)
    looks_like_path = text.endswith(".gguf") or text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_like_path:
        raise CosmicBakeError(f"model not found: {text}", "check the path, or use a Hub id like owner/name")
    hub_id, _, revision = text.partition("@")
    return ModelSource(text, "hub", hub_id=hub_id, revision=revision or None)


def load_tokenizer(source: ModelSource):
    """The tokenizer, set to left padding with a pad token (batched prompts end aligned)."""
    from transformers import AutoTokenizer

    try:
        if source.extra_folder is not None:
            tok = AutoTokenizer.from_pretrained(str(source.extra_folder))
        elif source.kind == "gguf":
            tok = AutoTokenizer_from_gguf(source.path)
        elif source.kind == "folder":
            tok = AutoTokenizer.from_pretrained(str(source.path))
        else:
            tok = AutoTokenizer.from_pretrained(source.hub_id, revision=source.revision)
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear line
        raise CosmicBakeError(
            f"could not load the tokenizer of {source.spec}: {first_line(err)}",
            "check that the model files are complete (re-download a truncated file)",
        ) from err
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _plain_from_gguf(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """Dequantize a GGUF with transformers, then rebuild an ordinary (saveable) model."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = quantized.state_dict()
    del quantized
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CosmicBakeError(
            f"GGUF {path.name} did not map onto {type(plain).__name__}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}",
            "this GGUF architecture is not supported by transformers' GGUF reader",
        )
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()


def dequantized_folder(path: Path, dtype: torch.dtype) -> Path:
    """Where :func:`dequantized_cache` keeps the float copy of a GGUF file (made or not)."""
    stat = path.stat()
    key = f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}-{str(dtype).removeprefix('torch.')}"
    return cache_dir().parent / "dequantized" / key


def model_inputs(spec: str | os.PathLike | None) -> list[Path]:
    """The local files and folders a model spec is read from, for the output rule; loads nothing.

    A folder or .gguf file is itself (a GGUF also its dequantized copies); a builtin is its cached
    file; a Hub id is its folder in the Hub cache (even before it is downloaded: an output must
    not land where the model will be). A spec that names nothing is left to the loader's error.
    """
    if spec is None:
        return []
    text = str(spec)
    if text.startswith("builtin:"):
        from cosmic_bake.model.builtin import BUILTIN_MODELS

        name = text.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            return []
        path = cache_dir() / BUILTIN_MODELS[name].filename
    else:
        path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return [path, *(dequantized_folder(path, dtype) for dtype in DTYPES.values())]
    if path.exists() or text.startswith("builtin:"):
        return [path]
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf"):
        from huggingface_hub.constants import HF_HUB_CACHE
        from huggingface_hub.file_download import repo_folder_name

        return [Path(HF_HUB_CACHE) / repo_folder_name(repo_id=text.partition("@")[0], repo_type="model")]
    return []


def dequantized_cache(path: Path, dtype: torch.dtype) -> Path:
    """A plain safetensors copy of a GGUF model, made once and reused.

    transformers dequantizes GGUF in Python (about 40 s for a 0.5B Q4_K_M model on two cores);
    the cached folder loads in a second or two. Keyed by the file's size and mtime plus dtype, written
    to a temporary folder and renamed, so an interrupted run never leaves a folder that looks
    complete. ``COSMIC_BAKE_NO_CACHE=1`` turns it off.
    """
    folder = dequantized_folder(path, dtype)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    model = _plain_from_gguf(path, dtype)
    tokenizer = AutoTokenizer_from_gguf(path)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".tmp-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
        os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory cleans up the (now empty) name
    return folder


def cached_gguf_folder(source: ModelSource, dtype: torch.dtype) -> Path:
    """Fill ``source.extra_folder`` with the dequantized cache of a GGUF source; one-line errors."""
    try:
        source.extra_folder = dequantized_cache(source.path, dtype)
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line
        raise CosmicBakeError(
            f"could not read GGUF file {source.path}: {first_line(err)}",
            "check the file is a complete GGUF model (re-download a truncated file)",
        ) from err
    return source.extra_folder


def AutoTokenizer_from_gguf(path: Path):  # noqa: N802 - mirrors the transformers name
    """The tokenizer stored inside a GGUF file (vocabulary, merges, chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_model(
    spec: str | os.PathLike, *, dtype: str | torch.dtype = "float32", placement: Placement | None = None
) -> LoadedModel:
    """Load model and tokenizer; every failure becomes one :class:`CosmicBakeError` line.

    ``placement`` (default: ``Placement()``, the best device present) puts the model on one device
    or hands it to accelerate's dispatch (device map, memory budget, disk offload); ``dtype``
    ``"auto"`` is bfloat16 on a GPU and float32 on the CPU. Without a GPU the default is the plain
    CPU load.
    """
    from transformers import AutoModelForCausalLM

    placement = placement or Placement()
    torch_dtype = resolve_dtype(dtype, compute_device(placement))
    source = resolve(spec)
    if source.kind == "gguf" and os.environ.get("COSMIC_BAKE_NO_CACHE") != "1":
        cached_gguf_folder(source, torch_dtype)
    place = from_pretrained_kwargs(placement)
    if source.kind == "gguf" and source.extra_folder is None and place:
        raise CosmicBakeError(
            "a GGUF model read without the cache (COSMIC_BAKE_NO_CACHE=1) loads on the CPU only",
            "unset COSMIC_BAKE_NO_CACHE, or use --device cpu",
        )
    tokenizer = load_tokenizer(source)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        if source.extra_folder is not None:
            model = AutoModelForCausalLM.from_pretrained(str(source.extra_folder), dtype=torch_dtype, **place).eval()
        elif source.kind == "gguf":
            model = _plain_from_gguf(source.path, torch_dtype)
        elif source.kind == "folder":
            model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch_dtype, **place).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source.hub_id, revision=source.revision, dtype=torch_dtype, **place
            ).eval()
    except CosmicBakeError:
        raise
    except Exception as err:  # noqa: BLE001
        if is_out_of_memory(err):
            raise CosmicBakeError(
                f"model {source.spec} does not fit on {compute_device(placement)}: {first_line(err)}",
                "use --device-map auto (with --max-memory and --offload-folder), or --dtype bfloat16",
            ) from err
        raise CosmicBakeError(
            f"could not load model {source.spec}: {first_line(err)}",
            "check the file is a complete causal-LM checkpoint (re-download a truncated file)",
        ) from err
    remove_with(model, place.get("offload_folder"))
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, source, torch_dtype, extra={"placement": placement, **_device_map(model)})


def _device_map(model: torch.nn.Module) -> dict:
    """``{"device_map": {module: device}}`` as accelerate placed the model (nothing for a one-device load)."""
    placed = getattr(model, "hf_device_map", None)
    return {"device_map": dict(placed)} if placed else {}


def source_folder(spec: str):
    """``(ModelSource, folder)``: the safetensors folder to bake for a model spec.

    A folder is itself; a GGUF file (or builtin) is dequantized once into the float32 cache that
    ``load_model`` uses too (``source.extra_folder``); a Hub id is fetched into the Hub cache.
    """
    source = resolve(spec)
    if source.kind == "folder":
        return source, source.path
    if source.kind == "gguf":
        return source, cached_gguf_folder(source, torch.float32)
    return source, _hub_snapshot(source)


def _hub_snapshot(source) -> Path:
    """Download (or find in the Hub cache) the files baking needs: safetensors, configs, tokenizer, card.

    The card (README.md) is read for the license the baked model's card carries over; it is not copied.
    """
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            source.hub_id,
            revision=source.revision,
            allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "README.md"],
        )
    except Exception as err:  # noqa: BLE001 - network / auth / missing repo become one line
        raise CosmicBakeError(
            f"could not fetch {source.hub_id} from the Hub: {first_line(err)}",
            "download the model to a folder and pass that folder",
        ) from err
    return Path(path)
