"""Progress bars for long work: counts, rate and ETA on stderr, quiet when not a terminal in CI."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap ``items`` in a bar; ``COSMIC_BAKE_QUIET=1`` hides it."""
    disable = os.environ.get("COSMIC_BAKE_QUIET") == "1"
    return iter(
        tqdm(
            items,
            desc=desc,
            total=total,
            file=sys.stderr,
            disable=disable,
            dynamic_ncols=True,
            mininterval=1.0 if not sys.stderr.isatty() else 0.1,
        )
    )


def note(line: str) -> None:
    """One line of news on stderr (what a long step will take); ``COSMIC_BAKE_QUIET=1`` hides it."""
    if os.environ.get("COSMIC_BAKE_QUIET") != "1":
        print(line, file=sys.stderr, flush=True)
