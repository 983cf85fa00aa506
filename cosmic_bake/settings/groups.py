"""Option groups several commands share (loading, prompt sets, selection, evaluation, baking).

Each group is a settings base class; a command's class inherits the groups it takes, so an
option shared by two commands is defined once, with one default and one help text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.settings.base import Settings, opt

SYSTEM_PROMPT_HELP = (
    "System prompt replacing the template's default: TEXT, @FILE, or preset:NAME (preset:refuse-all is the "
    "paper's adversarial complete-refusal setting)."
)
FORCE_HELP = "Replace an earlier cosmic-bake output (or an empty folder) at -o."
RECORD_PATHS_HELP = (
    "Write local paths (model and files as typed, absolute paths) into manifests and reports; by default "
    "outputs name them by Hub id or file name, size and hash, fit to upload. push publishes paths only "
    "from outputs made with this."
)
BASE_MODEL_HELP = (
    "Hub id of the model this edit derives from, for the card's base_model and the GGUF's base-model keys "
    "(default: the source's Hub id or a GGUF's own keys; none is guessed)."
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
# GGUF type names (checked against export.ggml_quant by the tests; kept here so settings never import gguf)
OUTTYPES = "f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k".split()
EDITED_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_0", "q5_1", "q4_k", "q4_0", "q4_1")


def read_system_prompt(value: str) -> str:
    from cosmic_bake.prompts.presets import read_system_prompt as read

    return read(value)


def parse_eval_layers(value: Any) -> tuple[int, ...] | float:
    """``--eval-layers``: ``0.2`` (a fraction of the layers, lowest similarity first) or ``19,23`` (or a list)."""
    if isinstance(value, list | tuple):
        return tuple(value)
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(value) if isinstance(value, float) else (value,)
    text = str(value).strip()
    try:
        if "." in text and "," not in text:
            return float(text)
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CosmicBakeError(
            f"--eval-layers '{value}' is neither a fraction nor a list of layer indices", "pass e.g. 0.2 or 19,23"
        ) from None


def parse_limit(value: Any) -> int | str:
    from cosmic_bake.prompts.sets import parse_limit as parse

    return parse(value)


BATCH_HELP = (
    "Prompts per batch: N, or auto (32 on the CPU, 128 on an accelerator, halved on out-of-memory; "
    "generation at most 32 from a number)."
)


def parse_batch_size(value: Any) -> int | str:
    from cosmic_bake.model.batching import parse_batch_size as parse

    return parse(value)


def parse_alphas(value: Any) -> tuple[float, ...]:
    """``"0,0.5,1"`` (or a list) -> ``(0.0, 0.5, 1.0)`` with a one-line error for anything else."""
    try:
        if isinstance(value, list | tuple):
            return tuple(float(x) for x in value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (float(value),)
        return tuple(float(x) for x in str(value).split(",") if x.strip())
    except (TypeError, ValueError):
        problem = f"--alphas '{value}' is not a comma-separated list of numbers"
        raise CosmicBakeError(problem, "e.g. --alphas 0,0.5,1,2") from None


def lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


@dataclass(frozen=True, kw_only=True)
class Recording(Settings):
    """Whether an output may name local paths (every command that writes a manifest or report)."""

    record_paths: bool = opt(False, RECORD_PATHS_HELP)


@dataclass(frozen=True, kw_only=True)
class PlacementOptions(Settings):
    """Where a model's layers go (:class:`~cosmic_bake.model.devices.Placement`; accelerate dispatches maps)."""

    device: str = opt(
        "auto", "auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps: the whole model on one device."
    )
    device_map: str | None = opt(
        None,
        "Spread the model with accelerate: auto | balanced | sequential | FILE.json (module -> device, cpu or disk).",
    )
    max_memory: str | None = opt(None, "Memory budget per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
    offload_folder: str | None = opt(None, "Where accelerate may offload weights to disk (implies --device-map auto).")

    def placement(self):
        """The :class:`~cosmic_bake.model.devices.Placement` these options describe."""
        from cosmic_bake.model.devices import Placement

        return Placement(**self.group(PlacementOptions))


@dataclass(frozen=True, kw_only=True)
class LoadOptions(PlacementOptions):
    """How a model is loaded and prompted for hooks (every command that runs a model)."""

    chat_template: str | None = opt(
        None, "Jinja template or format string with {instruction} (FILE or STRING).", inputs="file"
    )
    system_prompt: str | None = opt(None, SYSTEM_PROMPT_HELP, parse=read_system_prompt, inputs="file")
    dtype: str = opt(
        "auto", "auto: bfloat16 on a GPU, float32 on the CPU (scores accumulate in float64).", choices=DTYPES
    )
    batch_size: int | str = opt("auto", BATCH_HELP, parse=parse_batch_size)


@dataclass(frozen=True, kw_only=True)
class TrainingSets(Settings):
    """The training and validation prompts of the commands that select (``select``, ``compare``)."""

    harmful: str = opt("builtin:harmful", "Harmful training prompts.", inputs="file")
    harmless: str = opt("builtin:harmless", "Harmless training prompts.", inputs="file")
    harmful_val: str | None = opt(
        None, "Harmful validation prompts (default: hold out the last 16, at most 20%, of --harmful).", inputs="file"
    )
    harmless_val: str | None = opt(
        None, "Harmless validation prompts (default: hold out the last 16, at most 20%, of --harmless).", inputs="file"
    )
    column: str | None = opt(None, "Column holding the prompt in csv/parquet/json/Hub sets.")
    limit: int | str | None = opt(
        None,
        "Training prompts per set: N (the first N) or all. Default: a seeded sample of 128 from a larger file, "
        "else the whole file in order.",
        parse=parse_limit,
    )
    limit_val: int | str | None = opt(
        None,
        "Validation prompts per set: N (the first N) or all. Default: a seeded sample of 32 from a larger set, "
        "else the whole set in order.",
        parse=parse_limit,
    )
    sample_seed: int = opt(42, "Seed of the default samples of large prompt files.")

    def prompt_sets(self):
        """The four prompt lists (reads the files: call it before loading a model, to fail early)."""
        from cosmic_bake.prompts.sets import prompt_sets

        return prompt_sets(
            self.harmful,
            self.harmless,
            self.harmful_val,
            self.harmless_val,
            self.column,
            self.limit,
            self.limit_val,
            self.sample_seed,
        )


@dataclass(frozen=True, kw_only=True)
class SelectionOptions(Settings):
    """How candidates are made and scored (``select`` and ``compare``)."""

    direction_method: str = opt(
        "mean",
        "Difference in means (the paper), the first principal component of the paired differences, or the "
        "difference in means less its component along the harmless mean (projected, as heretic).",
        choices=("mean", "pca", "projected"),
    )
    eval_layers: tuple[int, ...] | float | None = opt(
        None,
        "Override L_low: a fraction of the layers (e.g. 0.2) or layer indices (e.g. 19,23). Default: 10%.",
        parse=parse_eval_layers,
    )
    kl_threshold: float = opt(0.1)


@dataclass(frozen=True, kw_only=True)
class EvalSets(Settings):
    """The prompts and generation length of ``eval`` and ``sweep``."""

    harmful: str = opt("builtin:harmful", inputs="file")
    harmless: str = opt("builtin:harmless", inputs="file")
    column: str | None = opt(None)
    limit_harmful: int | None = opt(None, min=1)
    limit_harmless: int | None = opt(100, min=1)
    max_new_tokens: int = opt(64, min=1)

    def eval_prompts(self) -> tuple[list[str], list[str]]:
        """(harmful, harmless) prompt lists."""
        from cosmic_bake.prompts.sets import load_prompts

        return (
            load_prompts(self.harmful, self.column, limit=self.limit_harmful),
            load_prompts(self.harmless, self.column, limit=self.limit_harmless),
        )


@dataclass(frozen=True, kw_only=True)
class BakeOptions(Recording):
    """What a bake writes, whatever the format (``bake`` and the API's bake functions)."""

    force: bool = opt(False, FORCE_HELP)
    embeddings: str = opt(
        "untie",
        "Edit the token embedding (untying a tied output head), or leave it alone (differs from the hook).",
        choices=("untie", "skip"),
    )
    max_shard_size: str | None = opt(None, "Reshard the output (e.g. 2GB); default: the source's shards.")
    allow_mismatch: bool = opt(False, "Bake a direction selected on a different model file.")
    outtype: str | None = opt(
        None,
        "GGUF output type (llama.cpp quantizer for q*). Default: keep a GGUF source's types, else f16.",
        choices=tuple(OUTTYPES),
        case_sensitive=False,
    )
    edited_type: str = opt(
        "q8_0",
        "GGUF source: type for edited tensors whose own type cannot hold them.",
        choices=EDITED_TYPES,
        case_sensitive=False,
    )
    edited_type_always: bool = opt(
        False, "GGUF source: write every edited tensor as --edited-type (closer to the hook than a 4-bit source type)."
    )
    mode: str | None = opt(
        None,
        "Edit to bake (default: the direction's): remove, add alpha*r at its layer, ACE pinned there, "
        "or scale the component around the harmful/harmless midpoint by 1 + alpha.",
        choices=("ablate", "add", "affine", "scale"),
    )
    alpha: float | None = opt(None, "Coefficient for add / affine (default: the direction's).")
    base_model: str | None = opt(None, BASE_MODEL_HELP)

    def check(self) -> None:
        from cosmic_bake.export.lineage import check_base_model

        check_base_model(self.base_model)


@dataclass(frozen=True, kw_only=True)
class FolderOutput(Recording):
    """Commands that write one output folder (``select``, ``compare``, ``sweep``)."""

    output: Path = opt(help="Folder to write.", short="-o", record=False)
    force: bool = opt(False, FORCE_HELP)
