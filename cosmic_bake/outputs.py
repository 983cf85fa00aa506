"""Writing results safely: atomic output folders, file hashes and the manifest.

Outputs are built in a hidden temporary folder beside the target and renamed into place only when
complete, so an interrupted run never leaves a folder that looks finished. An existing target is
replaced only with ``force=True``; a target inside the source model is always refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cosmic_bake import __version__
from cosmic_bake.errors import CosmicBakeError, first_line

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_target(target: Path, *, force: bool, protect: list[Path] | None = None) -> None:
    """Refuse a target that exists (without ``force``) or lies inside a protected source."""
    target = Path(target).resolve()
    for src in protect or []:
        src = Path(src).resolve()
        root = src if src.is_dir() else src.parent
        if src.is_dir() and (target == root or root in target.parents):
            raise CosmicBakeError(
                f"output {target} is inside the source model {root}", "write the output somewhere else"
            )
        if target == src:
            raise CosmicBakeError(f"output {target} is the source model itself", "write the output somewhere else")
    if target.exists() and not force:
        raise CosmicBakeError(f"{target} already exists", "pass --force to replace it, or choose another -o path")


@contextlib.contextmanager
def atomic_dir(target: Path, *, force: bool = False, protect: list[Path] | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` only if the block finishes."""
    target = Path(target)
    check_target(target, force=force, protect=protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path, fix: str) -> dict:
    """The JSON object in ``path``; anything else is one :class:`CosmicBakeError` line naming the file.

    Indexes, manifests and run stamps are written by tools but then copied, merged, truncated by a
    full disk or edited by hand; ``json``'s own error is a traceback that names neither the file
    nor what to do about it. ``fix`` says that, for the kind of file read.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise CosmicBakeError(f"{path} is not readable JSON ({first_line(err)})", fix) from err
    if not isinstance(data, dict):
        raise CosmicBakeError(f"{path} holds a JSON {type(data).__name__}, not an object", fix)
    return data


def write_json(path: Path, data: object) -> None:
    """Pretty JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def environment() -> dict[str, str]:
    """Versions that affect the numbers."""
    import torch
    import transformers

    return {
        "cosmic_bake": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def source_record(source) -> dict:
    """Where the model came from, with file hashes so anyone can check they have the same one."""
    rec: dict = {"spec": source.spec, "kind": source.kind}
    if source.hub_id:
        rec.update(hub_id=source.hub_id, revision=source.revision)
    rec["files"] = {p.name: sha256_file(p) for p in source.files}
    return rec


def manifest(folder: Path, *, stage: str, source: dict, extra: dict) -> dict:
    """Write ``manifest.json`` describing ``folder``: inputs, settings, results and file hashes."""
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    data = {
        "tool": "cosmic-bake",
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": environment(),
        "source_model": source,
        **extra,
        "files": files,
    }
    write_json(folder / MANIFEST, data)
    return data
