"""The robust learning rate (Ozdayi, Kantarcioglu and Gel, "Defending against Backdoors in
Federated Learning with Robust Learning Rate", AAAI 2021)."""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsim.checks import check, check_integer, check_positive
from strategies.defences.base import Aggregate, Defence, Updates, mean_update


class RLR(Defence):
    """Robust learning rate (Ozdayi et al., AAAI 2021): per coordinate, the server's
    learning rate is +server_lr where |sum_i sign(u_i)| >= threshold, else -server_lr.

    The FedAvg mean of the updates (weighted by examples) is multiplied, coordinate by
    coordinate, by that learning rate: where too few clients agree on the sign, the step is
    reversed. Defaults ``threshold = 4`` (the authors' setting for 10 clients a round on
    Fashion-MNIST; 8 of 40 on CIFAR-10) and ``server_lr = 1``. Every client is accepted;
    BatchNorm statistics are averaged, never reversed.

    A threshold above the number of clients would reverse every coordinate: sampling fewer
    clients than ``threshold`` is refused, and a round with fewer useful replies (clients
    failed) accepts none and keeps the global model. ``threshold = 1`` would be FedAvg
    (with an odd number of clients no sum of signs is 0) and is refused.

    This is the authors' code (``compute_robustLR`` and ``agg_avg`` of ``aggregation.py``):
    sign(0) = 0, so a coordinate a client left unchanged counts for neither side; a sum of
    signs equal to the threshold keeps the step; the step is lr * the example-weighted mean.
    Their other aggregators (coordinate-wise median, majority sign) and their noise and
    clipping options are not part of this rule (fedsim's norm-clipping and weak-dp
    defences are the latter). Their code fixes ``server_lr = 1`` with the mean; any
    ``server_lr`` > 0 is allowed here and scales the step as their rule says. Their vector
    holds the parameters only and leaves buffers unaggregated; BatchNorm statistics are
    averaged here, as said above.
    """

    name = "rlr"
    filters = False

    def __init__(self, strategy: Strategy, *, threshold: int = 4, server_lr: float = 1.0, **kwargs) -> None:
        super().__init__(strategy, **kwargs)
        check(
            isinstance(threshold, bool) or threshold != 1,
            "threshold = 1 reverses only the coordinates whose signs cancel exactly (none with an odd number of "
            "clients): FedAvg; set threshold >= 2",
        )
        self.threshold = check_integer("threshold", threshold, minimum=2)
        self.server_lr = check_positive("server_lr", server_lr)

    def min_clients(self) -> int:
        return self.threshold

    def too_few_clients(self, sampled: int) -> str:
        return (
            f"rlr: threshold = {self.threshold} exceeds the {sampled} clients a round samples, so every "
            "coordinate's learning rate would be negative; lower threshold or sample more clients"
        )

    def learning_rates(self, vectors: np.ndarray) -> np.ndarray:
        """Per coordinate: +server_lr where |sum_i sign(u_i)| >= threshold, else -server_lr."""
        agreement = np.abs(np.sign(vectors).sum(axis=0))
        return np.where(agreement >= self.threshold, self.server_lr, -self.server_lr)

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        if len(updates) < self.threshold:
            log(
                WARNING,
                "RLR: %d useful replies in round %d, fewer than threshold = %d; the global model is kept",
                len(updates),
                server_round,
                self.threshold,
            )
            return Aggregate(np.zeros(updates.vectors.shape[1]), [])
        update = self.learning_rates(updates.vectors) * mean_update(updates.vectors, updates.weights)
        return Aggregate(update, list(range(len(updates))))
