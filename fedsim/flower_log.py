"""How much of Flower's and Ray's own logs a fedsim command shows."""

from __future__ import annotations

import logging

_verbose = False  # what the command asked for, read when an engine starts Ray


def quiet_flower(verbose: bool = False) -> None:
    """Flower logs every sampling and aggregation step at INFO, a client's traceback at
    ERROR and, when a strategy is built, warnings about its options; fedsim reports all
    of it itself, so Flower speaks only with ``verbose``. Ray, started later by an engine,
    follows the same choice (:func:`ray_log_options`)."""
    global _verbose
    _verbose = verbose
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def ray_log_options() -> dict:
    """``ray.init`` options: Ray's own log and its workers' output reach the terminal only
    with ``verbose``; either way Ray keeps them in its session folder
    (``/tmp/ray/session_latest/logs``)."""
    return {"logging_level": logging.INFO if _verbose else logging.ERROR, "log_to_driver": _verbose}
