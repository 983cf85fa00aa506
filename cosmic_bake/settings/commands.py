"""The settings of each command: what ``select``, ``bake``, ``verify``, ``eval``, ``sweep``,
``compare``, ``push`` and ``run`` accept, with their defaults and the rules between options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.model.builtin import DEFAULT_MODEL
from cosmic_bake.settings.base import Settings, opt
from cosmic_bake.settings.groups import (
    BakeOptions,
    EvalSets,
    FolderOutput,
    LoadOptions,
    Recording,
    SelectionOptions,
    TrainingSets,
    parse_alphas,
    parse_batch_size,
)

MODEL_HELP = "Hub id, model folder, .gguf file or builtin:NAME."
COMPARE_MODE_HELP = "Edit every chosen direction is scored and evaluated with (affine: alpha 0)."


@dataclass(frozen=True, kw_only=True)
class Selecting(LoadOptions, TrainingSets, SelectionOptions, FolderOutput):
    """What the commands that select from a model's activations share (``select``, ``compare``)."""

    model: str = opt(DEFAULT_MODEL, MODEL_HELP, argument=True, inputs="model")


@dataclass(frozen=True, kw_only=True)
class SelectSettings(Selecting):
    """``select``: choose a refusal direction and its layer; write a run folder."""

    command = "select"
    mode: str = opt(
        "ablate",
        "Score removal (ablate), the bakeable affine edit (affine), or the paper's one-layer ACE (ace, hook only).",
        choices=("ablate", "affine", "ace"),
    )
    selector: str = opt("cosmic", choices=("cosmic", "refusal-score"))
    alphas: tuple[float, ...] = opt(
        (),
        "--mode affine: sweep these alphas on the validation prompts and record the safest (e.g. 0.5,1,2).",
        parse=parse_alphas,
    )
    max_harmless_refusal: float = opt(0.05, min=0, max=1)
    all_scores: bool = opt(
        False,
        "Compute every candidate's KL, for the full table and plots (default: only while it can change the choice).",
    )
    search_trials: int = opt(
        0,
        "After choosing, search per-layer removal strengths and the direction among the top candidates for N "
        "Optuna trials, scored on activations (S_comply, KL); the run then holds the searched edit.",
        min=0,
    )
    search_kl: float = opt(
        0.05, "--search-trials: the most harmless first-token KL (validation) a chosen edit may have."
    )
    search_candidates: int = opt(8, "--search-trials: how many of the best candidates the search may remove.", min=1)
    under: Path | None = opt(
        None,
        "Select on the model as edited by RUN_DIR's hook (a jailbroken model without baking it); recorded.",
        inputs="file",
    )
    under_one_layer: bool = opt(
        False, "--under: remove RUN_DIR's direction at the input of its own layer only (the paper's protocol)."
    )

    def check(self) -> None:
        if self.alphas and self.mode != "affine":
            raise CosmicBakeError("--alphas applies to --mode affine", "drop --alphas, or select with --mode affine")
        if self.under_one_layer and self.under is None:
            raise CosmicBakeError("--under-one-layer needs --under RUN_DIR", "pass the run whose direction to remove")
        if self.search_trials and self.mode != "ablate":
            raise CosmicBakeError(
                "--search-trials searches a weighted removal", "select with --mode ablate, or drop --search-trials"
            )


@dataclass(frozen=True, kw_only=True)
class BakeSettings(BakeOptions):
    """``bake``: the direction of a run folder baked into a model's weights (hf, gguf) or LoRA adapters."""

    command = "bake"
    model: str = opt(help=MODEL_HELP, argument=True, inputs="model")
    direction: Path = opt(help="RUN_DIR written by select.", inputs="file")
    format: str = opt(
        "hf",
        "Output: a transformers folder, a GGUF file, or LoRA adapters (PEFT + llama.cpp) for an unchanged base.",
        choices=("hf", "gguf", "lora"),
    )
    output: Path = opt(help="Folder (hf) or .gguf file to write.", short="-o", record=False)
    gguf_adapter: bool = opt(
        True, "--format lora: also write adapter.gguf for llama.cpp.", secondary="--no-gguf-adapter"
    )

    def check(self) -> None:
        super().check()
        if self.format == "lora" and (self.outtype is not None or self.mode not in (None, "ablate")):
            raise CosmicBakeError("--format lora carries linear removal only", "drop --outtype / --mode")
        if self.format == "hf" and self.outtype is not None:
            raise CosmicBakeError("--outtype applies to --format gguf", "drop --outtype, or pass --format gguf")


@dataclass(frozen=True, kw_only=True)
class VerifySettings(LoadOptions, Recording):
    """``verify``: a baked output against the original with the hook it equals."""

    command = "verify"
    original: str = opt(help="The model that was baked.", argument=True, inputs="model")
    baked: str = opt(help="The baked folder, .gguf file or LoRA adapter.", argument=True, inputs="model")
    direction: Path = opt(help="RUN_DIR used for baking.", inputs="file")
    prompts: str | None = opt(None, "Prompt file or dataset (default: 16+16 built-ins).", inputs="file")
    column: str | None = opt(None, "Column holding the prompt in csv/parquet/json sets.")
    limit: int | None = opt(None, "Use at most N prompts (per built-in set).", min=1)
    output: Path | None = opt(None, "JSON report to write.", short="-o", record=False)
    force: bool = opt(False, "Replace an earlier cosmic-bake report at -o.")
    batch_size: int | str = opt(
        "auto",
        "Prompts per batch: N, or auto (8 on the CPU, 128 on an accelerator, halved on out-of-memory).",
        parse=parse_batch_size,
    )


@dataclass(frozen=True, kw_only=True)
class EvalSettings(LoadOptions, EvalSets, Recording):
    """``eval``: refusal rates and harmless KL of a model, with or without an intervention."""

    command = "eval"
    model: str = opt(DEFAULT_MODEL, MODEL_HELP, argument=True, inputs="model")
    direction: Path | None = opt(None, "RUN_DIR from select.", inputs="file")
    intervention: str | None = opt(
        None,
        "Hook to apply (default: remove when --direction is given, else none).",
        choices=("none", "remove", "add", "affine", "pin", "scale"),
    )
    alpha: float | None = opt(None, "Coefficient for add/affine (default: the artifact's).")
    kl_against: str | None = opt(
        None,
        "Unedited model to measure harmless KL against (for evaluating a baked model; same tokenizer).",
        inputs="model",
    )
    runtime: str = opt(
        "auto",
        "auto: llama.cpp for a .gguf file without a hook (much faster on CPU), else transformers.",
        choices=("auto", "transformers", "llama.cpp"),
    )
    output: Path | None = opt(None, "JSON report to write.", short="-o", record=False)
    force: bool = opt(False, "Replace an earlier cosmic-bake report at -o.")

    @property
    def kind(self) -> str:
        """The hook actually applied: ``--intervention``, else remove with a direction, else none."""
        return self.intervention or ("remove" if self.direction else "none")

    def check(self) -> None:
        if self.kind != "none" and self.direction is None:
            raise CosmicBakeError(f"--intervention {self.kind} needs a direction", "pass --direction RUN_DIR")


@dataclass(frozen=True, kw_only=True)
class SweepSettings(LoadOptions, EvalSets, FolderOutput):
    """``sweep``: refusal rates and KL of a steering edit over a list of alphas."""

    command = "sweep"
    model: str = opt(help=MODEL_HELP, argument=True, inputs="model")
    direction: Path = opt(help="RUN_DIR from select.", inputs="file")
    mode: str = opt("affine", choices=("add", "affine", "scale"))
    alphas: tuple[float, ...] = opt((0.0, 0.5, 1.0, 1.5, 2.0), "Comma-separated alphas.", parse=parse_alphas)
    max_harmless_refusal: float = opt(0.05, min=0, max=1)


@dataclass(frozen=True, kw_only=True)
class CompareSettings(Selecting):
    """``compare``: COSMIC and the refusal-score selector on the same prompts, one table."""

    command = "compare"
    mode: str = opt("ablate", COMPARE_MODE_HELP, choices=("ablate", "affine"))
    eval_harmful: str = opt(help="Harmful prompts for the refusal rates (not used to select).", inputs="file")
    eval_harmless: str = opt(help="Harmless prompts for refusal rate and KL (not used to select).", inputs="file")
    limit_eval_harmful: int | None = opt(None, min=1)
    limit_eval_harmless: int | None = opt(100, min=1)
    max_new_tokens: int = opt(64, min=1)


@dataclass(frozen=True, kw_only=True)
class PushSettings(Settings):
    """``push``: upload a baked model or a run folder to the Hub."""

    command = "push"
    folder: Path = opt(help="A bake or run output folder, or a baked .gguf file.", argument=True)
    repo_id: str = opt(help="owner/name of the Hub model repository (created if missing).")
    private: bool = opt(False, "Create the repository as private.")
    revision: str | None = opt(None, "Branch to commit to (default: main).")
    no_gguf: bool = opt(False, "Leave the run's GGUF files out.")
    dry_run: bool = opt(False, "List what would be uploaded and print the card; upload nothing.")
    show_card: bool = opt(True, "Print the card with --dry-run.", secondary="--no-show-card")

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", self.repo_id):
            problem = f"--repo-id '{self.repo_id}' is not owner/name"
            raise CosmicBakeError(problem, "e.g. --repo-id you/model-name-edited")


@dataclass(frozen=True, kw_only=True)
class RunSettings(Recording):
    """``run``: one recipe from model to verified, evaluated exports."""

    command = "run"
    recipe_file: Path = opt(help="The recipe (TOML).", argument=True, inputs="file")
    output: Path | None = opt(
        None, "Run folder (default: the recipe's output, else runs/RECIPE_NAME).", short="-o", record=False
    )
    model: str | None = opt(None, "Use this model instead of the recipe's.")
    overrides: tuple[str, ...] = opt(
        (), "Override a recipe key, e.g. --set select.limit=32 (repeatable).", flag="--set", multiple=True
    )
    fresh: bool = opt(False, "Run every step again even when its inputs are unchanged.")


COMMANDS: dict[str, type[Settings]] = {
    cls.command: cls
    for cls in (
        SelectSettings,
        BakeSettings,
        VerifySettings,
        EvalSettings,
        SweepSettings,
        CompareSettings,
        PushSettings,
        RunSettings,
    )
}
