"""Upload a baked model (or a whole ``run`` folder) to the Hugging Face Hub in one commit.

The plan is computed first and is all ``--dry-run`` shows: which local file goes to which path in
the repository, its size, and the model card that will be uploaded as ``README.md``. A run folder
(from ``cosmic-bake run``) uploads its transformers model at the repository root, its GGUF files
beside it, and the direction, plots and reports under ``cosmic-bake/``; its card carries the verify
and eval figures. The upload itself is one ``create_commit``: huggingface_hub stores large files
(safetensors, GGUF) through the Hub's large-file storage on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cosmic_bake.errors import CosmicBakeError, first_line
from cosmic_bake.export.card import CARD_FILE

LARGE_FILE = 10 * 2**20  # the Hub stores files above this (and every binary) through large-file storage
SKIP = {".stamps"}


@dataclass(frozen=True)
class Upload:
    """One file of the commit: from ``local`` (or the card text) to ``path_in_repo``."""

    path_in_repo: str
    local: Path | None
    size: int


@dataclass
class PushPlan:
    files: list[Upload]
    card: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _walk(folder: Path, prefix: str, skip_names: set[str] = frozenset()) -> list[Upload]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or rel.parts[0] in SKIP or p.name in skip_names or p.name.startswith("."):
            continue
        out.append(Upload(f"{prefix}{rel.as_posix()}", p, p.stat().st_size))
    return out


def plan_push(folder: Path, include_gguf: bool = True) -> PushPlan:
    """What would be uploaded from ``folder`` (a baked transformers folder, or a ``run`` folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CosmicBakeError(f"{folder} is not a folder", "pass a baked model folder or a 'cosmic-bake run' folder")
    if (folder / "model" / "config.json").is_file():  # a run folder
        files = _walk(folder / "model", "", {CARD_FILE})
        if include_gguf and (folder / "gguf").is_dir():
            files += _walk(folder / "gguf", "")
        for sub in ("direction", "reports"):
            if (folder / sub).is_dir():
                files += _walk(folder / sub, f"cosmic-bake/{sub}/")
        for name in ("summary.md", "summary.json", "manifest.json"):
            if (folder / name).is_file():
                files.append(Upload(f"cosmic-bake/{name}", folder / name, (folder / name).stat().st_size))
        card_file = folder / "card.md" if (folder / "card.md").is_file() else folder / "model" / CARD_FILE
    elif (folder / "config.json").is_file():
        files = _walk(folder, "", {CARD_FILE})
        card_file = folder / CARD_FILE
    else:
        raise CosmicBakeError(
            f"{folder} holds neither config.json nor model/config.json",
            "pass the folder written by 'cosmic-bake bake' or 'cosmic-bake run'",
        )
    if not any(f.path_in_repo.endswith((".safetensors", ".gguf")) for f in files):
        raise CosmicBakeError(f"{folder} has no weights to upload", "bake the model first")
    card = card_file.read_text(encoding="utf-8") if card_file.is_file() else ""
    files.append(Upload(CARD_FILE, None, len(card.encode("utf-8"))))
    return PushPlan(files, card)


def hub_token() -> str:
    """The token from the usual places (``HF_TOKEN``, then the ``huggingface-cli login`` cache)."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise CosmicBakeError(
            "no Hugging Face token found (HF_TOKEN is unset and there is no login cache)",
            "run 'hf auth login' or set HF_TOKEN to a token with write access",
        )
    return token


def push(plan: PushPlan, repo_id: str, *, private: bool = False, revision: str | None = None, message: str) -> str:
    """Create the repository if needed and upload every planned file in one commit; returns its URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    token = hub_token()
    api = HfApi(token=token)
    ops = [
        CommitOperationAdd(f.path_in_repo, plan.card.encode("utf-8") if f.local is None else str(f.local))
        for f in plan.files
    ]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, ops, commit_message=message, revision=revision, repo_type="model")
    except Exception as err:  # noqa: BLE001 - network and permission errors become one line
        raise CosmicBakeError(
            f"upload to {repo_id} failed: {first_line(err)}", "check the token's write access"
        ) from err
    return str(getattr(info, "commit_url", f"https://huggingface.co/{repo_id}"))
