"""How much of Flower's own log a fedsim command shows."""

from __future__ import annotations

import logging


def quiet_flower(verbose: bool = False) -> None:
    """Flower logs every sampling and aggregation step at INFO, a client's traceback at
    ERROR and, when a strategy is built, warnings about its options; fedsim reports all
    of it itself, so Flower speaks only with ``verbose``."""
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
