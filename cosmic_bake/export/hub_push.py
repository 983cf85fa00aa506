"""Upload a baked model (or a whole ``run`` folder) to the Hugging Face Hub in one commit.

The plan is computed first and is all ``--dry-run`` shows: which local file goes to which path in
the repository, its size, and the model card that will be uploaded as ``README.md``. A run folder
(from ``cosmic-bake run``) uploads its transformers model at the repository root, its GGUF files
beside it, and the direction, plots and reports under ``cosmic-bake/``; its card carries the verify
and eval figures. A baked folder, a LoRA folder, or a baked ``.gguf`` file (with its manifest;
its card is made from the manifest) upload on their own. The upload itself is one
``create_commit``: huggingface_hub stores large files (safetensors, GGUF) through the Hub's
large-file storage on its own.

Nothing with a local path goes up by accident: every card, manifest, report and text file of the
plan, and the string metadata of its GGUF and safetensors files, is searched for absolute paths
(:func:`~cosmic_bake.sharing.local_paths_in`); :func:`check_shareable` refuses the plan in one line
unless the output was made with ``record_paths`` (its manifest says so). ``run`` folders keep
their local paths in ``.stamps/``, which is never uploaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cosmic_bake.errors import CosmicBakeError, first_line
from cosmic_bake.export.card import CARD_FILE
from cosmic_bake.sharing import local_paths_in

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
    record_paths: bool = False  # the output was made with record_paths: paths in it are wanted
    local_paths: list[tuple[str, str]] = field(default_factory=list)  # (path in repo, local path found)

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
    """What would be uploaded from ``folder``: a baked or LoRA folder, a ``run`` folder, or a baked ``.gguf``.

    The plan lists the local paths found in what it would upload (``local_paths``); see
    :func:`check_shareable`.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() == ".gguf":
        files, card = _plan_gguf(folder)
    elif not folder.is_dir():
        raise CosmicBakeError(
            f"{folder} is not a folder or a .gguf file",
            "pass a baked model folder, a .gguf file or a 'cosmic-bake run' folder",
        )
    elif (folder / "model" / "config.json").is_file() or _stage(folder / "manifest.json") == "run":
        files, card = _plan_run(folder, include_gguf)
    elif (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        files = _walk(folder, "", {CARD_FILE})
        card_file = folder / CARD_FILE
        card = card_file.read_text(encoding="utf-8") if card_file.is_file() else ""
    else:
        raise CosmicBakeError(
            f"{folder} holds neither config.json nor model/config.json",
            "pass the folder written by 'cosmic-bake bake' or 'cosmic-bake run', or a baked .gguf file",
        )
    if not any(f.path_in_repo.endswith((".safetensors", ".gguf")) for f in files):
        raise CosmicBakeError(f"{folder} has no weights to upload", "bake the model first")
    files.append(Upload(CARD_FILE, None, len(card.encode("utf-8"))))
    plan = PushPlan(files, card)
    plan.record_paths = any(_manifest_records_paths(f.local) for f in files if f.local is not None)
    plan.local_paths = find_local_paths(plan)
    return plan


def _plan_run(folder: Path, include_gguf: bool) -> tuple[list[Upload], str]:
    files = _walk(folder / "model", "", {CARD_FILE}) if (folder / "model").is_dir() else []
    if include_gguf and (folder / "gguf").is_dir():
        files += _walk(folder / "gguf", "")
    for sub in ("direction", "reports"):
        if (folder / sub).is_dir():
            files += _walk(folder / sub, f"cosmic-bake/{sub}/")
    for name in ("summary.md", "summary.json", "manifest.json"):
        if (folder / name).is_file():
            files.append(Upload(f"cosmic-bake/{name}", folder / name, (folder / name).stat().st_size))
    card_file = folder / "card.md" if (folder / "card.md").is_file() else folder / "model" / CARD_FILE
    if card_file.is_file():
        return files, card_file.read_text(encoding="utf-8")
    ggufs = sorted((folder / "gguf").glob("*.gguf")) if (folder / "gguf").is_dir() else []
    return files, _gguf_card(ggufs[0]) if ggufs else ""


def _plan_gguf(path: Path) -> tuple[list[Upload], str]:
    from cosmic_bake.outputs import gguf_manifest_path

    sidecar = gguf_manifest_path(path)
    if not sidecar.is_file():
        raise CosmicBakeError(f"{path} has no {sidecar.name} beside it", "push a GGUF that 'cosmic-bake bake' wrote")
    files = [Upload(path.name, path, path.stat().st_size), Upload(sidecar.name, sidecar, sidecar.stat().st_size)]
    return files, _gguf_card(path)


def _gguf_card(path: Path) -> str:
    from cosmic_bake.export.card import gguf_card
    from cosmic_bake.outputs import gguf_manifest_path, read_json

    sidecar = gguf_manifest_path(path)
    if not sidecar.is_file():
        return ""
    return gguf_card(read_json(sidecar, "bake the GGUF again"), path.name)


def _stage(manifest: Path) -> str | None:
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def _manifest_records_paths(path: Path) -> bool:
    if not path.name.endswith("manifest.json"):
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("record_paths") is True
    except (OSError, ValueError, AttributeError):
        return False


TEXT_SUFFIXES = (".md", ".json", ".txt", ".jinja", ".toml", ".yaml", ".yml", ".csv")


def _strings_of(upload: Upload, card: str) -> str:
    """The text of an upload that could hold a path: the card, a text file, or binary files' metadata."""
    if upload.local is None:
        return card
    name = upload.local.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return upload.local.read_text(encoding="utf-8", errors="replace")
    if name.endswith(".gguf"):
        from cosmic_bake.export.gguf_io import open_gguf

        values = []
        for key, f in open_gguf(upload.local).fields.items():
            if key.startswith("tokenizer."):
                continue  # vocabularies: tokens, not paths
            try:
                values.append(str(f.contents()))
            except Exception:  # noqa: BLE001 - an odd value type is no string either
                continue
        return "\n".join(values)
    if name.endswith(".safetensors"):
        from cosmic_bake.export.safetensors_read import read_header

        return json.dumps(read_header(upload.local)[0])
    return ""


def find_local_paths(plan: PushPlan) -> list[tuple[str, str]]:
    """(path in repo, absolute local path) for every absolute path in what ``plan`` would upload."""
    found = []
    for upload in plan.files:
        for path in local_paths_in(_strings_of(upload, plan.card)):
            found.append((upload.path_in_repo, path))
    return found


def check_shareable(plan: PushPlan) -> None:
    """Refuse, in one line, a plan that would publish a local path the user did not ask to record."""
    if plan.local_paths and not plan.record_paths:
        where, path = plan.local_paths[0]
        more = f" (and {len(plan.local_paths) - 1} more)" if len(plan.local_paths) > 1 else ""
        raise CosmicBakeError(
            f"{where} holds the local path {path}{more}, which would be published",
            "make it again with this cosmic-bake (it writes file names, not folders), or with --record-paths",
        )


def render_plan(plan: PushPlan, repo_id: str, *, dry_run: bool, show_card: bool = True) -> str:
    """What ``push`` prints: the file list (and the card, for a dry run)."""
    verb = "would upload" if dry_run else "uploading"
    lines = [f"{verb} {len(plan.files)} files, {plan.total_bytes / 2**20:.1f} MiB, to {repo_id}"]
    for f in plan.files:
        lfs = "lfs" if f.size > LARGE_FILE or f.path_in_repo.endswith((".safetensors", ".gguf", ".png")) else "   "
        src = "(card)" if f.local is None else str(f.local)
        lines.append(f"  {f.size / 2**20:10.2f} MiB  {lfs}  {f.path_in_repo}  <- {src}")
    if dry_run and show_card:
        lines.append("\n--- README.md (card) ---\n" + plan.card)
    return "\n".join(lines)


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
    """Create the repository if needed and upload every planned file in one commit; returns its URL.

    Refuses (:func:`check_shareable`) before anything leaves the machine.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    check_shareable(plan)
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
