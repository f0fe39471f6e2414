"""Parameter checks: the one idiom for refusing a bad constructor argument.

Every partitioner, strategy, defence and attack checks its parameters in its constructor
with these functions, so that a component built directly in Python (a user's own Flower
app) and one built from an experiment file refuse the same values with the same one line.
From an experiment file, :mod:`fedsim.registry` first coerces each TOML value to the type
of its parameter (an ``int`` stays an ``int``, ``0.5`` for a ``float``); the range, the
choices and what a type annotation cannot say are checked here, once.

Each function raises a one-line :class:`ValueError` that names the parameter, the value it
got and what is allowed (``"kappa must be a finite number > 0, got 0.0"``), and returns
the value when it passes (numbers coerced to ``int`` or ``float``), so that a constructor
may write ``self.kappa = check_positive("kappa", kappa)``. Booleans are never numbers
here: ``True`` is not a count or a learning rate, even though Python says it is 1.

A check with a message of its own (a rule between two parameters, an option that would
make a method a no-op) is written with :func:`check`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "check",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_fraction",
    "check_integer",
    "check_number",
    "check_positive",
]


def check(condition: Any, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(message)


def _shown(value: Any) -> str:
    """``value`` as the message shows it: NumPy scalars as the Python numbers they hold."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int``: an integer (Python's or NumPy's, never a bool or a float)
    within ``[minimum, maximum]`` (either bound optional)."""
    if minimum is not None and maximum is not None:
        allowed = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        allowed = f"an integer >= {minimum}"
    elif maximum is not None:
        allowed = f"an integer <= {maximum}"
    else:
        allowed = "an integer"
    ok = (
        isinstance(value, (int, np.integer))
        and not _is_bool(value)
        and (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
    )
    check(ok, f"{name} must be {allowed}, got {_shown(value)}")
    return int(value)


def _number_range(above: float | None, at_least: float | None, below: float | None, at_most: float | None) -> str:
    """What :func:`check_number` allows, in words: ``a finite number > 0`` or ``in (0, 1]``."""
    low = f"({above}" if above is not None else f"[{at_least}" if at_least is not None else None
    high = f"{below})" if below is not None else f"{at_most}]" if at_most is not None else None
    if low is not None and high is not None:
        return f"in {low}, {high}"
    bounds = [
        f"> {above}" if above is not None else f">= {at_least}" if at_least is not None else "",
        f"< {below}" if below is not None else f"<= {at_most}" if at_most is not None else "",
    ]
    return " ".join(["a finite number", *(bound for bound in bounds if bound)])


def check_number(
    name: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> float:
    """``value`` as a ``float``: a finite real number (never a bool, NaN or infinity) with
    ``value > above``, ``value >= at_least``, ``value < below`` and ``value <= at_most``
    (each optional; give at most one lower and one upper bound)."""
    if (above is not None and at_least is not None) or (below is not None and at_most is not None):
        raise TypeError("check_number takes at most one lower bound (above, at_least) and one upper (below, at_most)")
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not _is_bool(value) and math.isfinite(value)
    ok = (
        ok
        and (above is None or value > above)
        and (at_least is None or value >= at_least)
        and (below is None or value < below)
        and (at_most is None or value <= at_most)
    )
    check(ok, f"{name} must be {_number_range(above, at_least, below, at_most)}, got {_shown(value)}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a ``float``: a finite number > 0."""
    return check_number(name, value, above=0)


def check_fraction(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a ``float``: a share of a whole, ``0 < value < 1`` (``0 <= value < 1``
    with ``allow_zero``)."""
    if allow_zero:
        return check_number(name, value, at_least=0, below=1)
    return check_number(name, value, above=0, below=1)


def _listed(choices: tuple[Any, ...]) -> str:
    shown = [repr(choice) for choice in choices]
    if len(shown) <= 2:
        return " or ".join(shown)
    return "one of " + ", ".join(shown)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value``, which must be one of ``choices``."""
    choices = tuple(choices)
    try:
        ok = bool(value in choices)
    except (TypeError, ValueError):  # an array compared elementwise is no choice
        ok = False
    check(ok, f"{name} must be {_listed(choices)}, got {_shown(value)}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a ``bool``: ``True`` or ``False`` (Python's or NumPy's), never 0 or 1."""
    check(_is_bool(value), f"{name} must be true or false, got {_shown(value)}")
    return bool(value)


def check_callable(name: str, value: Any, what: str = "a callable") -> Any:
    """``value``, which must be callable; ``what`` says what it should be (``"a callable
    that builds the model"``)."""
    check(callable(value), f"{name} must be {what}, got {type(value).__name__}")
    return value
