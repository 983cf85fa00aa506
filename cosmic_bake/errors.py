"""The one exception type users see.

Every problem a user can fix (a missing file, a malformed prompt set, a model we cannot handle)
is raised as :class:`CosmicBakeError` with one line that names the problem and the fix. The CLI
prints that line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CosmicBakeError(Exception):
    """A user-facing error: ``str(err)`` is one line saying what is wrong and what to do."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type), for wrapping library errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
