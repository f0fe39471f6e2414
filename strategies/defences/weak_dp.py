"""Weak differential privacy (Sun et al., "Can You Really Backdoor Federated Learning?", 2019)."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fedsim.checks import check_number
from strategies.defences.base import Aggregate, Updates
from strategies.defences.norm_clipping import NormClipping


class WeakDP(NormClipping):
    """Weak DP (Sun et al., "Can You Really Backdoor Federated Learning?", 2019).

    Norm clipping (:class:`NormClipping`, bound ``clip_norm``), then Gaussian noise of
    standard deviation ``noise_std`` added to every parameter of the aggregate. Defaults
    ``clip_norm = 5.0`` and ``noise_std = 0.025`` (the paper's weak-DP noise, as in the
    BackFed port). The
    noise is drawn from a generator seeded by (``seed``, round), so a run does not depend
    on what else drew random numbers; BatchNorm statistics get none.

    Flower's ``DifferentialPrivacyServerSideFixedClipping`` does the same steps, but it is
    not used: it draws its noise from NumPy's global generator (unseeded), sets the
    standard deviation as noise_multiplier * clip / sampled clients rather than directly,
    pairs reply and global arrays by position (a FedBN reply, which lacks the BatchNorm
    arrays, fails its ``zip(strict=True)``), and clips the integer BatchNorm counters too.
    """

    name = "weak-dp"

    def __init__(self, strategy: Strategy, *, clip_norm: float = 5.0, noise_std: float = 0.025, **kwargs) -> None:
        super().__init__(strategy, clip_norm=clip_norm, **kwargs)
        self.noise_std = check_number("noise_std", noise_std, at_least=0)

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        result = super().aggregate_updates(server_round, updates)
        noise = self.rng(server_round).normal(0.0, self.noise_std, size=result.update.shape)
        return Aggregate(result.update + noise, result.accepted)
