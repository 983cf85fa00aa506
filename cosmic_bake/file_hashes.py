"""SHA-256 of model files, read once per machine: a cache keyed by path, size and modification time.

Every stage records the source model's file hashes (``artifacts.source_record``: select, bake,
export, verify's unedited reference; the builtin check on every load), and reading a 16 GB
checkpoint takes about a minute each time. :func:`file_sha256` reads a file once and keeps its
digest in ``file-hashes.json`` beside the builtin models' folder (``$COSMIC_BAKE_MODELS/..``,
else ``~/.cache/cosmic-bake``), keyed by the resolved path and valid while the file's size and
``st_mtime_ns`` are unchanged: any write to the file (or ``touch``) makes it read again. An edit
that keeps both size and mtime (only deliberate with ``os.utime``) is not seen; that is the
usual trade of make-like caches. ``COSMIC_BAKE_NO_CACHE=1`` reads every time.

A file in the Hugging Face Hub cache (``.../models--OWNER--NAME/snapshots/COMMIT/FILE``) is not
read at all when the Hub publishes its SHA-256: large files are stored with Git LFS, whose
metadata carries the content's SHA-256 and size (``HfApi.get_paths_info``, at the snapshot's
commit, so the answer cannot change). The size must match the local file; without a network
(or with ``HF_HUB_OFFLINE=1``) the file is read as any other.

The cache is a convenience: a missing, unreadable or corrupt file is treated as empty and
rewritten (atomically: a temporary file renamed into place); failing to write it is ignored.
Entries of files that no longer exist are dropped whenever it is written.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cosmic_bake.outputs import sha256_file, write_json

CACHE_NAME = "file-hashes.json"
MIN_BYTES = 1 << 20  # smaller files are read every time: cheaper than keeping them in the cache
MAX_ENTRIES = 20_000
_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_file() -> Path:
    """Where the digests are kept (the same root as ``model.builtin.cache_dir``'s parent)."""
    models = os.environ.get("COSMIC_BAKE_MODELS")
    root = Path(models).parent if models else Path.home() / ".cache" / "cosmic-bake"
    return root / CACHE_NAME


def _enabled() -> bool:
    return os.environ.get("COSMIC_BAKE_NO_CACHE") != "1"


def _load() -> dict[str, dict]:
    """The cached entries; anything unreadable counts as no cache."""
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(v, dict)}


def _store(key: str, entry: dict) -> None:
    """Add one entry and write the cache back (atomically; errors ignored)."""
    files = _load()
    files[key] = entry
    files = {k: v for k, v in files.items() if os.path.exists(k)}
    if len(files) > MAX_ENTRIES:
        files = dict(list(files.items())[-MAX_ENTRIES:])
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, {"version": _VERSION, "files": files})
    except OSError:
        pass


def _entry(st: os.stat_result, digest: str, how: str) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest, "from": how}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of ``path``'s content (hex): from the cache, the Hub's metadata, or by reading it once."""
    path = Path(path)
    real = path.resolve()
    st = real.stat()
    if not _enabled() or st.st_size < MIN_BYTES:
        return sha256_file(real)
    key = str(real)
    hit = _load().get(key)
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        digest = hit.get("sha256")
        if isinstance(digest, str) and _SHA256.fullmatch(digest):
            return digest
    digest, how = hub_sha256(path, st.st_size), "hub"
    if digest is None:
        digest, how = sha256_file(real), "read"
    _store(key, _entry(st, digest, how))
    return digest


def remember(path: str | os.PathLike, digest: str) -> None:
    """Record a digest just computed some other way (e.g. while the file was written or checked)."""
    real = Path(path).resolve()
    st = real.stat()
    if _enabled() and st.st_size >= MIN_BYTES and _SHA256.fullmatch(digest):
        _store(str(real), _entry(st, digest, "known"))


def hub_location(path: str | os.PathLike) -> tuple[str, str, str] | None:
    """``(repo_id, commit, path in the repo)`` of a file under a Hub cache snapshot, else None.

    Read from the path as given (not resolved: the snapshot entry is a symlink into ``blobs/``),
    e.g. ``.../models--Qwen--Qwen2.5-7B/snapshots/<commit>/model-00001-of-00004.safetensors``.
    """
    parts = Path(os.path.abspath(path)).parts
    for i, part in enumerate(parts[:-3]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/"), parts[i + 2], "/".join(parts[i + 3 :])
    return None


def _hub_api():
    """The Hub client (a function, so a test can put a local stand-in for the Hub's metadata here)."""
    from huggingface_hub import HfApi

    return HfApi()


def hub_sha256(path: str | os.PathLike, size: int) -> str | None:
    """The SHA-256 the Hub publishes for a Hub-cache file (Git LFS metadata), if it has one of ``size`` bytes.

    None when the file is not in a Hub cache snapshot, is not an LFS file (small text files: the
    Hub gives only their git blob id, which is not a SHA-256 of the content), the sizes differ, or
    the Hub cannot be asked (offline, no network, no access).
    """
    where = hub_location(path)
    if where is None:
        return None
    repo_id, commit, name = where
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        infos = _hub_api().get_paths_info(repo_id, [name], revision=commit, repo_type="model")
    except Exception:  # noqa: BLE001 - no network, no access, no such repo: read the file instead
        return None
    for info in infos:
        lfs = getattr(info, "lfs", None)
        if getattr(info, "path", None) != name or lfs is None:
            continue
        digest = str(getattr(lfs, "sha256", "")).lower()
        if int(getattr(lfs, "size", -1)) == size and _SHA256.fullmatch(digest):
            return digest
    return None
