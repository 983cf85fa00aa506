"""Writing results safely: one output rule, atomic outputs, file hashes and the manifest.

Every command that writes goes through :func:`check_target` (directly, or through
:func:`atomic_dir` / :func:`atomic_file`), so one rule decides what an output may be:

- it may never be, contain, or lie inside one of the command's inputs (model folder or file,
  direction run folder, prompt / template / system prompt files), with or without ``--force``;
  paths are compared after resolving ``~`` and symlinks, so a link cannot sneak round the rule;
- an existing target is refused without ``force``; with ``force`` it is replaced only when
  cosmic-bake itself wrote it (a folder whose ``manifest.json`` says ``"tool": "cosmic-bake"``
  and lists every file in it, a GGUF with ``cosmic_bake.*`` metadata and its sidecar manifest, a
  report JSON carrying the tool key) or when it is an empty folder. A user's folder or file is
  never removed: ``--force`` once meant "delete whatever is there", and an ``-o`` pointing at the
  parent of the source model deleted the model.

Outputs are built under a hidden temporary name beside the target and renamed into place only
when complete (the rule is checked again just before), so an interrupted run never leaves an
output that looks finished. ``mkstemp`` / ``mkdtemp`` create those temporaries private (0600 /
0700) whatever the umask; :func:`~cosmic_bake.sharing.share_modes` gives the finished output the modes an ordinary
``open()`` / ``mkdir()`` would (0644 / 0755 under umask 022), so another account, a web server or
a shared volume can read what was written for it.

What leaves the machine (cards, manifests, reports, GGUF metadata) names files by what is
portable: :func:`~cosmic_bake.sharing.portable` turns a local path into its file name, unless the user asked for
paths (``record_paths``).
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
from collections.abc import Iterable, Iterator
from pathlib import Path

from cosmic_bake import __version__
from cosmic_bake.errors import CosmicBakeError, first_line
from cosmic_bake.sharing import portable, share_modes

MANIFEST = "manifest.json"
TOOL = "cosmic-bake"  # the "tool" key of every manifest and report JSON: how an output is recognised
KINDS = ("folder", "gguf", "json", "run")
RUN_STAMPS = ".stamps"  # the recipe runner's step stamps (a run folder in progress has no manifest yet)
INPUT_FIX = "write the output somewhere else: -o may not be, contain or lie inside an input"
FORCE_FIX = "--force replaces only an earlier cosmic-bake output or an empty folder; choose another -o path"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _real(path: str | os.PathLike) -> Path:
    """Absolute path with ``~`` and every symlink resolved: two names of one file compare equal."""
    return Path(path).expanduser().resolve()


def gguf_manifest_path(out: Path) -> Path:
    """The manifest written beside a baked GGUF file: ``OUT.gguf.manifest.json``."""
    return out.with_name(out.name + ".manifest.json")


def file_inputs(*values: str | os.PathLike | None) -> list[Path]:
    """The local files and folders that option values name, for the output rule.

    Accepts what the options accept: a path, ``builtin:NAME`` (a shipped prompt set),
    ``preset:NAME`` and ``@FILE`` (system prompts); values that name nothing local (a Hub
    dataset id, an inline template or prompt text) are skipped.
    """
    paths: list[Path] = []
    for value in values:
        if value is None:
            continue
        text = str(value)
        if text.startswith("builtin:"):
            from cosmic_bake.prompts.sets import BUILTIN_SETS, builtin_path

            name = text.removeprefix("builtin:")
            paths += [builtin_path(name)] if name in BUILTIN_SETS else []
            continue
        if text.startswith("preset:"):
            text = str(Path(__file__).resolve().parent / "prompts" / "system" / f"{text.removeprefix('preset:')}.txt")
        text = text.removeprefix("@")
        if "\n" in text or len(text) > 4096:  # inline template or prompt text, not a path
            continue
        try:
            path = Path(text).expanduser()
            if path.exists():
                paths.append(path)
        except (OSError, ValueError):  # a name too long or with a NUL byte: not a file either
            continue
    return paths


def _check_inputs(target: Path, shown: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse ``target`` (resolved) when it is, contains or lies inside one of ``inputs``."""
    for given in inputs:
        inp = _real(given)
        if target == inp:
            relation = "is"
        elif inp in target.parents:
            relation = "is inside"
        elif target in inp.parents:
            relation = "contains"
        else:
            continue
        raise CosmicBakeError(f"output {shown} {relation} the input {given}", INPUT_FIX)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_tool_json(path: Path) -> bool:
    data = _read_json(path)
    return data is not None and data.get("tool") == TOOL


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _foreign_folder(folder: Path) -> str | None:
    """Why ``folder`` is not a cosmic-bake output folder (None: it is one, or it is empty)."""
    if not folder.is_dir():
        return "is a file, not an output folder"
    if _is_empty_dir(folder):
        return None
    data = _read_json(folder / MANIFEST)
    if data is None or data.get("tool") != TOOL:
        return f'exists and is not a cosmic-bake output (no {MANIFEST} with "tool": "{TOOL}")'
    listed = set(data.get("files") or {}) | {MANIFEST}
    extra = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(folder).as_posix() not in listed
    )
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        return f"holds files cosmic-bake did not write ({', '.join(extra[:3])}{more})"
    return None


def _foreign_gguf(path: Path) -> str | None:
    """Why ``path`` (and its sidecar manifest) is not a GGUF that cosmic-bake baked."""
    sidecar = gguf_manifest_path(path)
    if path.is_dir():
        return None if _is_empty_dir(path) else "is a folder, not a GGUF file"
    if path.exists():
        try:
            from cosmic_bake.export.gguf_io import read_metadata

            keys = list(read_metadata(path, "cosmic_bake."))
        except Exception:  # noqa: BLE001 - anything unreadable is not ours
            keys = []
        if not any(k.startswith("cosmic_bake.") for k in keys):
            return "is not a GGUF baked by cosmic-bake (no cosmic_bake.* metadata)"
        data = _read_json(sidecar)
        if data is None or data.get("tool") != TOOL or path.name not in (data.get("files") or {}):
            return f"has no cosmic-bake manifest naming it beside it ({sidecar.name})"
    elif sidecar.exists() and not _is_tool_json(sidecar):
        return f"has a {sidecar.name} beside it that cosmic-bake did not write"
    return None


def _foreign_report(path: Path) -> str | None:
    """Why ``path`` is not a report JSON that cosmic-bake wrote."""
    if path.is_dir():
        return None if _is_empty_dir(path) else "is a folder, not a report file"
    return None if _is_tool_json(path) else f'is not a cosmic-bake report (no "tool": "{TOOL}" in it)'


def _foreign_run(folder: Path) -> str | None:
    """Why ``folder`` is not a run folder of the recipe runner (which resumes in place)."""
    if not folder.is_dir():
        return "is a file, not a run folder"
    if _is_empty_dir(folder) or (folder / RUN_STAMPS).is_dir():
        return None
    data = _read_json(folder / MANIFEST)
    if data is not None and data.get("tool") == TOOL and data.get("stage") == "run":
        return None
    return "exists and is not a cosmic-bake run folder"


def _exists(path: Path, kind: str) -> bool:
    return path.exists() or (kind == "gguf" and gguf_manifest_path(path).exists())


def check_target(
    target: str | os.PathLike,
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike] = (),
    kind: str = "folder",
) -> Path:
    """The output rule (see the module docstring); returns the resolved target to write.

    ``kind`` says what is written: ``folder`` (a run / model / sweep / compare folder with its
    manifest), ``gguf`` (a baked GGUF file plus ``OUT.gguf.manifest.json``), ``json`` (a report)
    or ``run`` (the recipe runner's folder: an existing one is resumed, not replaced, so
    ``force`` does not apply; it must be empty or an earlier run's). Called before any expensive
    work and again just before an output is renamed into place, since a long bake leaves time
    for the target to change.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    inputs = list(inputs)
    real = _real(target)
    _check_inputs(real, target, inputs)
    if kind == "gguf":
        _check_inputs(gguf_manifest_path(real), gguf_manifest_path(Path(target)), inputs)
    if not _exists(real, kind):
        return real
    if kind == "run":
        problem = _foreign_run(real)
        if problem:
            raise CosmicBakeError(
                f"{target} {problem}", "choose a new or empty -o folder, or the folder of an earlier run to resume it"
            )
        return real
    if not force:
        shown = target if real.exists() else gguf_manifest_path(Path(target))  # a GGUF's leftover manifest
        raise CosmicBakeError(f"{shown} already exists", "pass --force to replace it, or choose another -o path")
    problem = {"folder": _foreign_folder, "gguf": _foreign_gguf, "json": _foreign_report}[kind](real)
    if problem:
        raise CosmicBakeError(f"{target} {problem}", FORCE_FIX)
    return real


def replace_file(tmp: Path, real: Path) -> None:
    """Rename the finished file ``tmp`` onto ``real`` (an empty folder there is removed first)."""
    if real.is_dir() and not real.is_symlink():
        os.rmdir(real)  # only ever succeeds on an empty folder
    os.replace(tmp, real)


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    kind: str = "folder",
) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` only if the block finishes.

    The output rule is checked on entry and again before the rename; a replaced earlier output
    is moved aside first and removed only once the new one is in place.
    """
    inputs = list(inputs)
    real = check_target(target, force=force, inputs=inputs, kind=kind)
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.partial-", dir=real.parent))
    try:
        yield tmp
        share_modes(tmp)
        check_target(target, force=force, inputs=inputs, kind=kind)
        if real.exists() and not _is_empty_dir(real):
            old = Path(tempfile.mkdtemp(prefix=f".{real.name}.old-", dir=real.parent))
            os.replace(real, old)  # a rename onto an empty folder: allowed for folders
            os.replace(tmp, real)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, real)  # a folder may replace an empty folder by rename
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


@contextlib.contextmanager
def atomic_file(
    target: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    kind: str = "json",
) -> Iterator[Path]:
    """Yield a temporary file path beside ``target`` that becomes ``target`` only if the block finishes."""
    inputs = list(inputs)
    real = check_target(target, force=force, inputs=inputs, kind=kind)
    real.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{real.name}.partial-", dir=real.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        share_modes(tmp)
        check_target(target, force=force, inputs=inputs, kind=kind)
        replace_file(tmp, real)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(
    path: str | os.PathLike,
    data: dict,
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike] = (),
    record_paths: bool = False,
) -> None:
    """A report JSON (verify / eval ``-o``), tagged with the tool so ``--force`` can recognise it later.

    Reports travel (``push`` uploads a run's), so the models and folders they name are written
    as file names unless ``record_paths`` (:func:`~cosmic_bake.sharing.portable`).
    """
    with atomic_file(path, force=force, inputs=inputs, kind="json") as tmp:
        write_json(tmp, {"tool": TOOL, **portable(data, record_paths), "record_paths": record_paths})


def write_json(path: Path, data: object) -> None:
    """Pretty JSON with a trailing newline, written under a temporary name and renamed into place."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """A UTF-8 text file written under a temporary name beside it and renamed into place."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        share_modes(name)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


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


def manifest(folder: Path, *, stage: str, source: dict, extra: dict, record_paths: bool = False) -> dict:
    """Write ``manifest.json`` describing ``folder``: inputs, settings, results and file hashes.

    The manifest is uploaded with the output, so local paths in ``source`` and ``extra`` become
    file names unless ``record_paths``, which the manifest records (``push`` reads it).
    """
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    data = {
        "tool": TOOL,
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": environment(),
        "record_paths": record_paths,
        "source_model": portable(source, record_paths),
        **portable(extra, record_paths),
        "files": files,
    }
    write_json(folder / MANIFEST, data)
    return data
