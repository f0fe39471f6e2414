"""Norm clipping (Sun et al., "Can You Really Backdoor Federated Learning?", 2019)."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fedsim.checks import check_positive
from strategies.defences.base import Aggregate, Defence, Updates, clip_to, mean_update


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
        self.clip_norm = check_positive("clip_norm", clip_norm)

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        clipped = clip_to(updates.vectors, self.clip_norm)
        return Aggregate(mean_update(clipped, updates.weights), list(range(len(updates))))
