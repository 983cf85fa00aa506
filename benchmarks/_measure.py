"""Shared by the memory benchmarks: peak RSS of a child process, disk high-water mark of a folder.

Peak RSS: the step runs in a fresh interpreter, which prints its own ``VmHWM`` (the kernel's
high-water mark of the resident set, file-backed pages included: a memory-mapped weight file
counts once touched) from ``/proc/self/status`` at the end, with ``VmRSS`` after its imports as
the baseline. Reading the child's own figure, rather than ``getrusage(RUSAGE_CHILDREN)`` in the
parent, keeps several children in one benchmark apart (the latter is the maximum over all of them).

Disk: a thread sums the allocated blocks (``st_blocks``) of every file under the folders given,
every ``interval`` seconds, and keeps the largest total; the step's own temporary files count as
long as they live under those folders (the benchmarks point every scratch folder there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2**30

# Prepended to every child: a function that reports the child's figures as one JSON line at exit.
_PRELUDE = r"""
import atexit, json, os, sys
def _status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0
_RESULT = {}
def _report():
    _RESULT["peak_rss_bytes"] = _status("VmHWM")
    print("\n@@RESULT@@" + json.dumps(_RESULT), flush=True)
atexit.register(_report)
"""


def run_child(code: str, *args: str, env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run ``code`` (which may fill the dict ``_RESULT``) in a fresh interpreter; return ``_RESULT``.

    ``_RESULT["peak_rss_bytes"]`` is the child's VmHWM at exit; ``wall_seconds`` is added here.
    ``_status("VmRSS")`` is available to the code for a baseline after its imports.
    """
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + code, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    wall = time.perf_counter() - t
    marker = proc.stdout.rfind("@@RESULT@@")
    if proc.returncode != 0 or marker < 0:
        raise SystemExit(f"child failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout[marker + len("@@RESULT@@") :].splitlines()[0])
    result["wall_seconds"] = wall
    return result


def tree_bytes(*folders: Path) -> int:
    """Bytes allocated on disk by every file under ``folders`` (a missing folder counts 0)."""
    total = 0
    for folder in folders:
        for root, _dirs, files in os.walk(folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
                except FileNotFoundError:  # removed while we walked
                    pass
    return total


class DiskWatch:
    """Context manager: the largest :func:`tree_bytes` of ``folders`` seen while it is open."""

    def __init__(self, *folders: Path, interval: float = 0.1) -> None:
        self.folders, self.interval = folders, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_bytes(*self.folders))
            self._stop.wait(self.interval)

    def __enter__(self) -> DiskWatch:
        self.base = tree_bytes(*self.folders)
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_bytes(*self.folders))

    @property
    def added(self) -> int:
        """The high-water mark above what the folders held when the watch started."""
        return self.peak - self.base


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def weight_bytes(folder: Path) -> int:
    """Bytes of a model folder's safetensors files (the model's size in its stored dtype)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
