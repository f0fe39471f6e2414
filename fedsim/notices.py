"""What fedsim tells a user besides its results: warnings (a problem the run goes on
despite) and notes (a choice fedsim made for the user), one line each on stderr, naming
the sweep run they come from."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

_LABELS: list[str] = []  # the sweep run this process is running, named in its warnings


@contextmanager
def run_label(name: str) -> Iterator[None]:
    """Name ``name`` in the warnings of what runs inside the block (a sweep's worker runs
    many runs of one experiment, and shares its stderr with the others)."""
    _LABELS.append(name)
    try:
        yield
    finally:
        _LABELS.pop()


def warn(message: str) -> None:
    """A problem the run goes on despite, on stderr."""
    _say("warning", message)


def note(message: str) -> None:
    """A choice fedsim made for the user (not a problem), on stderr."""
    _say("note", message)


def _say(kind: str, message: str) -> None:
    where = f"{_LABELS[-1]}: " if _LABELS else ""  # which run of a sweep says it
    print(f"{kind}: {where}{message}", file=sys.stderr, flush=True)
