"""Outputs fit to share: readable modes, and portable names in what leaves the machine.

Modes: ``mkstemp`` / ``mkdtemp`` create the temporaries that outputs are built under private
(0600 / 0700) whatever the umask; :func:`share_modes` gives a finished output the modes an
ordinary ``open()`` / ``mkdir()`` would (0644 / 0755 under umask 022), so another account, a web
server or a shared volume can read what was written for it.

Names: cards, manifests, reports and GGUF metadata are uploaded to the Hub or served to other accounts;
an absolute path in them publishes the user's account name and folder layout. These helpers turn
local paths into file names (Hub ids, ``builtin:`` names and URLs stay as they are), and find the
absolute paths ``push`` refuses to upload. A user who wants paths recorded asks for them
(``record_paths``), and the manifest says so.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without leaving it changed.

    Linux shows it in ``/proc/self/status``; elsewhere ``os.umask`` is the only way to read it,
    which sets it too, so it is set to the most private value (0o077: anything created meanwhile
    by another thread is private, never too open) and restored at once, under a lock.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def share_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes ``open()`` / ``mkdir()`` would.

    Files become ``0o666 & ~umask``, folders ``0o777 & ~umask`` (0644 / 0755 under umask 022).
    Called on an output just before it is renamed into place: its temporary name was created
    private, and files copied from the source (``shutil.copy2``) would keep the source's modes.
    Symlinks are left alone.
    """
    mask = current_umask()
    root = Path(path)
    todo = [root]
    while todo:
        p = todo.pop()
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if stat.S_ISDIR(st.st_mode):
            os.chmod(p, 0o777 & ~mask)
            todo.extend(p.iterdir())
        else:
            os.chmod(p, 0o666 & ~mask)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# a path inside text: starts at a word boundary with / or ~/ (not "a/b", not "https://")
_EMBEDDED_PATH = re.compile(r"(?<![\w.:/~-])(~?/[^\s\"'`<>|,;()\[\]{}]+)")


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` (optionally ``@revision``) that names no local file or folder."""
    name = str(text).partition("@")[0]
    if not _HUB_ID.match(name):
        return False
    try:
        return not Path(name).expanduser().exists()
    except (OSError, ValueError):
        return True


def portable_name(value: str | os.PathLike) -> str:
    """How a file or folder is named in what leaves the machine: its name, never its folders.

    ``builtin:NAME``, ``preset:NAME`` and Hub ids (``owner/name[@rev]``) are portable already;
    a local path (absolute, ``~``, relative as typed, or one that exists) becomes its last part.
    """
    text = os.fspath(value)
    if text.startswith(("builtin:", "preset:")) or looks_like_hub_id(text):
        return text
    if "\n" in text or len(text) > 4096:
        return text
    name = Path(text.rstrip("/")).expanduser().name
    return name or text


def _absolute_local(path: str) -> bool:
    """An absolute or ``~/`` path of this machine: ``~/...``, or ``/TOP/...`` with ``/TOP`` an existing folder.

    Demanding an existing top folder and a part below it keeps text that merely starts with a
    slash (``/no_think``, ``</s>`` in a chat template, "tokens/s") from being taken for a path.
    """
    if path.startswith("~/"):
        return True
    parts = Path(path).parts
    return len(parts) > 2 and parts[0] == "/" and Path("/", parts[1]).is_dir()


def _is_local_path(text: str) -> bool:
    """A whole value that names a local file or folder (absolute, ``~``, or relative and existing)."""
    if _absolute_local(text) or text == "~":
        return True
    if text.startswith("/"):
        return Path(text).exists()
    if "/" not in text and os.sep not in text:
        return False
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):
        return False


def portable_text(text: str) -> str:
    """``text`` with every local path in it reduced to its last part (see :func:`portable_name`).

    A whole value that is a path (absolute, ``~``, or relative and existing) becomes its name; inside
    longer text, absolute and ``~/`` paths do. Hub ids, URLs and ``builtin:`` names stay.
    """
    if not text:
        return text
    if "\n" not in text and len(text) <= 4096 and _is_local_path(text) and not looks_like_hub_id(text):
        return portable_name(text)

    def name(m: re.Match) -> str:
        path = m.group(1)
        return (Path(path.rstrip("/")).name or path) if _absolute_local(path) else path

    return _EMBEDDED_PATH.sub(name, text)


def portable(data, record_paths: bool = False):
    """``data`` (JSON-like) with local paths in its strings reduced to names, unless ``record_paths``."""
    if record_paths:
        return data
    if isinstance(data, str):
        return portable_text(data)
    if isinstance(data, os.PathLike):
        return portable_name(data)
    if isinstance(data, dict):
        return {k: portable(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [portable(v) for v in data]
    return data


def local_paths_in(text: str, extra: Iterable[str] = ()) -> list[str]:
    """Absolute local paths written in ``text``, and which of the ``extra`` strings it contains.

    What ``push`` refuses to upload: a path under ``~/``, or under ``/TOP/`` with ``/TOP`` a folder
    of this machine (``/home/...``, ``/tmp/...``; not ``/no_think`` or the ``/s`` of "tokens/s").
    """
    found = [m.group(1) for m in _EMBEDDED_PATH.finditer(text) if _absolute_local(m.group(1))]
    return found + [e for e in extra if e and e in text]
