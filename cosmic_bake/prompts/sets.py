"""Prompt sets: the two piles of instructions whose activations we compare.

The refusal direction is the difference between mean activations on harmful and harmless
prompts, so everything downstream depends on these lists being what the user thinks they are.
This module turns whatever the user points at (a built-in set, a local file, or a Hugging Face
Hub dataset) into a plain ``list[str]`` and refuses, with a one-line :class:`CosmicBakeError`,
anything that would silently skew the means: empty sets, blank or non-string entries, a
missing column, a file we cannot parse.

The built-in sets (``builtin:harmful`` and ``builtin:harmless``) were written for this project.
They match in form and length, so the difference between them is harmfulness rather than style.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cosmic_bake.errors import CosmicBakeError

BUILTIN_SETS = ("harmful", "harmless")
BUILTIN_PREFIX = "builtin:"
# Tried in order when the user names no column: the names common refusal datasets use.
DEFAULT_COLUMNS = ("instruction", "prompt", "goal", "text", "question", "behavior")
FILE_EXTENSIONS = (".json", ".jsonl", ".csv", ".txt", ".parquet")

_DATA_DIR = Path(__file__).parent / "data"
# owner/name or owner/name:split; we only go to the Hub when no local path of that name exists.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?$")

# (where in the source, the raw value) so errors can point at the offending line or index.
_Item = tuple[str, Any]


def builtin_path(name: str) -> Path:
    """Path of a built-in set, so callers can copy or inspect the shipped file."""
    if name not in BUILTIN_SETS:
        raise CosmicBakeError(
            f"unknown built-in prompt set {name!r}",
            f"use one of: {', '.join(BUILTIN_PREFIX + s for s in BUILTIN_SETS)}",
        )
    return _DATA_DIR / f"{name}.json"


def load_prompts(
    source: str | Path,
    column: str | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
) -> list[str]:
    """Load a prompt set as a list of stripped, non-empty strings.

    ``source`` is ``builtin:<name>``, a local .json/.jsonl/.csv/.txt/.parquet file, or a Hub
    dataset id ``owner/name[:split]``. ``column`` picks the field of object/table rows (default:
    the first of :data:`DEFAULT_COLUMNS` present). ``limit`` keeps the first N prompts, so runs
    stay reproducible when a large set is cut down.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CosmicBakeError(f"limit must be a positive integer, got {limit!r}", "pass limit >= 1 or None")

    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        path, where = builtin_path(source[len(BUILTIN_PREFIX) :]), source
    else:
        path, where = Path(source), str(source)

    if path.is_file():
        if split is not None:
            raise CosmicBakeError(f"{where}: split={split!r} only applies to Hub datasets", "drop the split option")
        prompts = _extract(_read_file(path, where), column, where)
    elif isinstance(source, str) and _looks_like_hub_id(source):
        prompts = _load_hub(source, column, split)
    elif path.is_dir():
        raise CosmicBakeError(f"{where} is a directory, not a prompt file", "point at a file inside it")
    else:
        raise CosmicBakeError(
            f"prompt file {where} not found",
            "check the path, or use builtin:harmful / builtin:harmless or a Hub id like owner/name",
        )
    return prompts[:limit] if limit is not None else prompts


def split_holdout(prompts: Sequence[str], fraction: float = 0.2, *, min_val: int = 4) -> tuple[list[str], list[str]]:
    """Split one set into (train, val), keeping order, when the user gave no validation set.

    The validation part is the last ``round(len * fraction)`` prompts (at least ``min_val``) and
    the training part must keep at least ``min_val`` too: a direction or a score computed from a
    handful of prompts is noise. Deterministic so the same input always gives the same split.
    """
    if not 0 < fraction < 1:
        raise CosmicBakeError(f"holdout fraction must be between 0 and 1, got {fraction!r}", "use e.g. 0.2")
    if min_val < 1:
        raise CosmicBakeError(f"min_val must be at least 1, got {min_val!r}")

    def n_val(n: int) -> int:
        return max(min_val, round(n * fraction))

    n = len(prompts)
    if n - n_val(n) < min_val:
        needed = next(m for m in itertools.count(2 * min_val) if m - n_val(m) >= min_val)
        raise CosmicBakeError(
            f"only {n} prompts: too few to hold out {fraction * 100:g}% for validation "
            f"(need at least {needed} for {min_val}+ in each part)",
            "add prompts or pass a separate validation set",
        )
    cut = n - n_val(n)
    return list(prompts[:cut]), list(prompts[cut:])


def require_count(prompts: Sequence[str], minimum: int, what: str) -> None:
    """Fail early, naming the set, when it is smaller than a later step needs."""
    if len(prompts) < minimum:
        raise CosmicBakeError(
            f"{what} has {len(prompts)} prompts but at least {minimum} are needed",
            "add prompts or lower the number requested",
        )


def _looks_like_hub_id(source: str) -> bool:
    """Hub ids look like owner/name; anything with a prompt-file extension is meant as a path."""
    return bool(_HUB_ID.match(source)) and not source.lower().endswith(FILE_EXTENSIONS)


def _read_file(path: Path, where: str) -> list[_Item]:
    """Parse a local file into (location, value) items; values are strings or dicts."""
    ext = path.suffix.lower()
    if ext == ".parquet":
        return _read_parquet(path, where)
    if ext not in FILE_EXTENSIONS:
        raise CosmicBakeError(
            f"{where}: unsupported prompt file type {ext or '(no extension)'!r}",
            f"use one of {', '.join(FILE_EXTENSIONS)}",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise CosmicBakeError(f"{where} is not valid UTF-8 text ({err.reason})", "re-save the file as UTF-8") from err

    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CosmicBakeError(
                f"{where}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})",
                "fix the file; it must be a JSON list of strings or objects",
            ) from err
        if not isinstance(data, list):
            raise CosmicBakeError(
                f"{where}: expected a JSON list, got {type(data).__name__}",
                "make the top level a list of strings or objects",
            )
        return [(f"index {i}", value) for i, value in enumerate(data)]
    if ext == ".jsonl":
        items: list[_Item] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise CosmicBakeError(
                    f"{where}: malformed JSON on line {lineno} ({err.msg})",
                    "each line must be one JSON object or string",
                ) from err
        return items
    if ext == ".csv":
        reader = csv.DictReader(text.splitlines())
        # line_num counts physical lines, so a quoted multi-line cell still reports its own line.
        return [(f"line {reader.line_num}", row) for row in reader]
    # .txt: one prompt per non-empty line.
    return [(f"line {n}", line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _read_parquet(path: Path, where: str) -> list[_Item]:
    """Read a parquet table with pandas (imported here: only parquet users pay for it)."""
    try:
        import pandas as pd
    except ImportError as err:
        raise CosmicBakeError(
            f"{where}: reading parquet needs pandas and pyarrow", "pip install pandas pyarrow"
        ) from err

    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise CosmicBakeError(f"{where}: cannot read parquet file ({_one_line(err)})", "check the file") from err
    return [(f"row index {i}", row) for i, row in enumerate(frame.to_dict("records"))]


def _load_hub(source: str, column: str | None, split: str | None) -> list[str]:
    """Load ``owner/name[:split]`` from the Hugging Face Hub via the optional ``datasets`` package."""
    name, _, id_split = source.partition(":")
    if id_split and split and id_split != split:
        raise CosmicBakeError(
            f"{source}: split {id_split!r} in the id disagrees with split={split!r}",
            "give the split in one place",
        )
    split = id_split or split or "train"
    where = f"Hub dataset {name} (split {split})"
    try:
        import datasets
    except ImportError as err:
        raise CosmicBakeError(
            f"{source} is not a local file, and loading Hub datasets needs the 'datasets' package",
            "pip install datasets, or point at a local file",
        ) from err
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, auth, unknown id or split: all fixable by the user
        raise CosmicBakeError(
            f"could not load {where} ({_one_line(err)}); no local file of that name exists either",
            "check the id and split, your network, and `huggingface-cli login` for gated datasets",
        ) from err
    chosen = _choose_column(list(dataset.column_names), column, where)
    return _validate([(f"row index {i}", v) for i, v in enumerate(dataset[chosen])], where, chosen)


def _extract(items: list[_Item], column: str | None, where: str) -> list[str]:
    """Turn parsed items (strings, or dict rows) into validated prompt strings."""
    if not items:
        raise CosmicBakeError(f"{where} contains no prompts", "add at least one prompt")
    if not any(isinstance(value, dict) for _, value in items):
        if column is not None:
            raise CosmicBakeError(
                f"{where}: column {column!r} given, but the file holds plain strings, not rows with columns",
                "drop the column option",
            )
        return _validate(items, where, None)

    columns: dict[str, None] = {}  # ordered union of keys, for the "available columns" message
    for loc, value in items:
        if not isinstance(value, dict):
            raise CosmicBakeError(
                f"{where}: {loc} is of type {type(value).__name__}, but other entries are objects",
                "make every entry an object with the same prompt field",
            )
        # csv.DictReader files surplus cells under the key None; they are not columns.
        columns.update(dict.fromkeys(k for k in value if isinstance(k, str)))
    chosen = _choose_column(list(columns), column, where)
    values: list[_Item] = []
    for loc, row in items:
        if chosen not in row:
            raise CosmicBakeError(f"{where}: {loc} has no {chosen!r} field", f"add {chosen!r} to every entry")
        values.append((loc, row[chosen]))
    return _validate(values, where, chosen)


def _choose_column(available: list[str], column: str | None, where: str) -> str:
    """The requested column, or the first conventional prompt column present."""
    shown = ", ".join(repr(c) for c in available) or "(none)"
    if column is not None:
        if column not in available:
            raise CosmicBakeError(
                f"{where}: no column {column!r}; available columns: {shown}",
                "pass one of the available columns",
            )
        return column
    for candidate in DEFAULT_COLUMNS:
        if candidate in available:
            return candidate
    raise CosmicBakeError(
        f"{where}: none of the usual prompt columns ({', '.join(DEFAULT_COLUMNS)}) found; available columns: {shown}",
        "name the prompt column explicitly",
    )


def _validate(items: list[_Item], where: str, column: str | None) -> list[str]:
    """Every prompt must be a non-blank string: a blank or numeric entry would skew the mean."""
    if not items:
        raise CosmicBakeError(f"{where} contains no prompts", "add at least one prompt")
    field = f" {column!r}" if column else ""
    prompts: list[str] = []
    for loc, value in items:
        if not isinstance(value, str):
            kind = "missing" if value is None else f"of type {type(value).__name__}"
            raise CosmicBakeError(
                f"{where}: {loc}{field} is {kind}, not a string",
                "every prompt must be non-empty text",
            )
        if not value.strip():
            raise CosmicBakeError(
                f"{where}: {loc}{field} is empty or whitespace only",
                "remove the entry or fill it in",
            )
        prompts.append(value.strip())
    return prompts


def _one_line(err: BaseException) -> str:
    """Squash a library's multi-line message so our error stays one line."""
    return " ".join(str(err).split()) or type(err).__name__


HOLDOUT = 16  # validation prompts held out of a training set when none is given (as the reference run)


VERIFY_DEFAULT_SETS = ("builtin:harmless", "builtin:harmful")


VERIFY_DEFAULT_LIMIT = 16


# Default sizes when a prompt file is larger (Arditi et al.'s n_train / n_val): selection time
# grows with them (one pass per training prompt; three passes per candidate per validation prompt),
# while a difference in means of 128 prompts already has the noise of a 1/sqrt(128) ~ 9% sample.
# Files at or under these sizes are used whole and in order (the built-in sets: 128 + 16; the
# reference case: 64 + 16).
DEFAULT_TRAIN = 128
DEFAULT_VAL = 32
DEFAULT_SEED = 42  # as the COSMIC and Arditi et al. pipelines seed their samples
ALL = "all"


class PromptSets(dict):
    """The four prompt lists by name, and how each was cut from its file (``sampling``)."""

    sampling: dict[str, dict]


def parse_limit(value: Any) -> int | str:
    """``--limit`` / ``--limit-val``: a count (the first N prompts) or ``all`` (every prompt)."""
    if isinstance(value, str) and value.strip().lower() == ALL:
        return ALL
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or isinstance(value, float) and value != n or n < 1:
        raise CosmicBakeError(f"limit '{value}' is neither a count of at least 1 nor 'all'", "pass e.g. 32, or all")
    return n


def cut(prompts: list[str], limit: int | str | None, default: int, seed: int) -> tuple[list[str], dict]:
    """``limit`` N: the first N; ``all``: everything; ``None``: a seeded sample of ``default``
    prompts, kept in file order, when there are more (else everything, in order)."""
    n = len(prompts)
    if limit == ALL or (limit is None and n <= default):
        return list(prompts), {"from": n, "kept": n, "how": "all"}
    if limit is not None:
        return list(prompts[:limit]), {"from": n, "kept": min(n, int(limit)), "how": "first"}
    keep = sorted(random.Random(seed).sample(range(n), default))
    return [prompts[i] for i in keep], {"from": n, "kept": default, "how": "sample", "seed": seed}


def prompt_sets(
    harmful: str = "builtin:harmful",
    harmless: str = "builtin:harmless",
    harmful_val: str | None = None,
    harmless_val: str | None = None,
    column: str | None = None,
    limit: int | str | None = None,
    limit_val: int | str | None = None,
    seed: int = DEFAULT_SEED,
) -> PromptSets:
    """The four prompt lists select needs; validation sets default to a held-out tail of training.

    Each list is cut by :func:`cut` (``limit`` for training, ``limit_val`` for validation, with
    :data:`DEFAULT_TRAIN` / :data:`DEFAULT_VAL` when not given); ``sampling`` records how.
    """

    def train_and_val(train: str, val: str | None) -> tuple[list[str], list[str]]:
        prompts = load_prompts(train, column)
        if val is not None:
            return prompts, load_prompts(val, column)
        return split_holdout(prompts, fraction=min(0.2, HOLDOUT / len(prompts)) if prompts else 0.2)

    hf, hf_val = train_and_val(harmful, harmful_val)
    hl, hl_val = train_and_val(harmless, harmless_val)
    sets, sampling = PromptSets(), {}
    for name, prompts in (
        ("harmful train", hf),
        ("harmless train", hl),
        ("harmful val", hf_val),
        ("harmless val", hl_val),
    ):
        train = "train" in name
        sets[name], sampling[name] = cut(
            prompts, limit if train else limit_val, DEFAULT_TRAIN if train else DEFAULT_VAL, seed
        )
        require_count(sets[name], 4 if train else 2, name)
    sets.sampling = sampling
    return sets


def verify_prompts(prompts: str | None = None, column: str | None = None, limit: int | None = None) -> list[str]:
    """A prompt file (first ``limit``), or the first 16 harmless and 16 harmful built-in prompts."""

    if prompts is not None:
        return load_prompts(prompts, column, limit=limit)
    n = limit or VERIFY_DEFAULT_LIMIT
    return [p for name in VERIFY_DEFAULT_SETS for p in load_prompts(name, limit=n)]
