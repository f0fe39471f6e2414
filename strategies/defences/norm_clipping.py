"""Norm clipping (Sun et al., "Can You Really Backdoor Federated Learning?", 2019)."""

from __future__ import annotations

import math

from flwr.serverapp.strategy import Strategy

from strategies.defences.base import Aggregate, Defence, Updates, check, clip_to, mean_update


class NormClipping(Defence):
    """Norm clipping (Sun et al., "Can You Really Backdoor Federated Learning?", 2019).

    Each client update is scaled to an L2 norm of at most ``clip_norm``
    (u * min(1, M / ||u||)), then the clipped updates are averaged as FedAvg does
    (weighted by examples). Default ``clip_norm = 5.0`` (one of the paper's bounds M);
    it should sit near the norm of a benign update, which depends on the model and
    the local training. Every client is accepted.
    """

    name = "norm-clipping"
    filters = False

    def __init__(self, strategy: Strategy, *, clip_norm: float = 5.0, **kwargs) -> None:
        super().__init__(strategy, **kwargs)
        check(
            isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0,
            f"clip_norm must be a finite number > 0, got {clip_norm!r}",
        )
        self.clip_norm = float(clip_norm)

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        clipped = clip_to(updates.vectors, self.clip_norm)
        return Aggregate(mean_update(clipped, updates.weights), list(range(len(updates))))
