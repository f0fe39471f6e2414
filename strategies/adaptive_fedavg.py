"""Adaptive-FedAvg (Canonaco, Bergamasco, Mongelluzzo & Roveri, "Adaptive Federated
Learning in Presence of Concept Drift", IJCNN 2021): FedAvg whose clients' learning rate
the server adapts to the global model's recent movement.

The rule read in the two reference implementations, which agree line by line:
wenwenwenwenti/FedCCFA at commit 647d8b097509e05278b7a68f116d2e84e106c72c
(``AdaptiveFedAvgServer.cal_adaptive_lr`` in ``entities/AdaptiveFedAvg.py``) and
microsoft/FedDrift at commit e4ac32fe17edf8de23579678a12fb4d7b5f45746 (``AdaState`` in
``fedml_api/distributed/fedavg_ens/FedAvgEnsDataLoader.py``). At step t = 1, 2, ..., with
theta_t the global model's parameters after the step's aggregation:

    mu_t = b1 mu_{t-1} + (1 - b1) theta_t                       mu^_t = mu_t / (1 - b1^t)
    s_t  = b2 s_{t-1} + (1 - b2) mean_j (theta_tj - mu^_{t-1,j})^2   s^_t = s_t / (1 - b2^t)
    g_t  = b3 g_{t-1} + (1 - b3) r_t,  r_t = s^_t / s^_{t-1} (1 at t = 1)   g^_t = g_t / (1 - b3^t)
    lr   = min(lr0, lr0 g^_t / t)

(mu_0 = mu^_0 = s_0 = g_0 = 0). A drift moves the model further than its recent history:
s^ jumps, the variance ratio r_t exceeds 1 and the learning rate rises (up to lr0, the
experiment's ``[client] lr``); without one it decays as 1/t. The server sends it to the
clients in the ``lr`` of every train config; the clients are FedAvg's.

``update_every = "round"`` (default) takes a step after every round and uses the new rate
from the next round on (FedCCFA's code, where t counts rounds). ``"slot"`` takes one step
per time slot of a drift stream, at the start of each slot s >= 1 with t = s and the
global model as the previous slot left it (FedDrift's ``iter`` mode, the one its README
lists for Adaptive-FedAvg; FedDrift takes it five rounds before the slot ends). On a
static partition ``"slot"`` keeps lr0 throughout.

Departures: theta is every floating-point array of the global model (its state dict, as
FedDrift; FedCCFA takes ``model.parameters()``): they differ only for BatchNorm buffers.
FedCCFA's script sets the new rate only on the round's sampled clients, and its clients
(``entities.base.Client``, not the ``AdaptiveFedAvgClient`` it defines) train with the
configured rate regardless, so its Adaptive-FedAvg runs as FedAvg; here, as in FedDrift,
every client trains with the rate the server sends. b1, b2, b3 default to FedCCFA's
configuration (0.7, 0.3, 0.7); FedDrift's defaults are 0.5, 0.5, 0.5.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedsim.checks import check_choice, check_fraction
from fedsim.trainer import TIME_SLOT
from strategies.fedavg import FedAvg

LR = "lr"  # the key of the clients' learning rate in the train config ([client] lr)


def parameter_vector(arrays: ArrayRecord) -> np.ndarray:
    """Every floating-point array of ``arrays``, flattened into one float64 vector."""
    parts = [a.numpy().astype(np.float64).ravel() for a in arrays.values() if np.issubdtype(a.dtype, np.floating)]
    return np.concatenate(parts) if parts else np.zeros(0)


class AdaptiveLearningRate:
    """The rule (see the module docstring): ``step(theta)`` takes step t + 1 and returns
    the new learning rate."""

    def __init__(self, lr0: float, beta1: float, beta2: float, beta3: float) -> None:
        self.lr0, self.beta1, self.beta2, self.beta3 = lr0, beta1, beta2, beta3
        self.t = 0
        self.mean = np.zeros(0)  # mu_t (empty before the first step)
        self.mean_hat = np.zeros(0)  # mu^_t
        self.variance = 0.0  # s_t
        self.variance_hat = 0.0  # s^_t
        self.ratio = 0.0  # g_t
        self.ratio_hat = 0.0  # g^_t (reported)
        self.lr = lr0

    def step(self, theta: np.ndarray) -> float:
        self.t += 1
        t, b1, b2, b3 = self.t, self.beta1, self.beta2, self.beta3
        previous_mean = self.mean if self.mean.size else np.zeros_like(theta)
        previous_mean_hat = self.mean_hat if self.mean_hat.size else np.zeros_like(theta)
        mean = b1 * previous_mean + (1 - b1) * theta
        variance = b2 * self.variance + (1 - b2) * float(np.mean((theta - previous_mean_hat) ** 2))
        variance_hat = variance / (1 - b2**t)
        ratio_now = variance_hat / self.variance_hat if self.variance_hat != 0 else 1.0
        ratio = b3 * self.ratio + (1 - b3) * ratio_now
        self.ratio_hat = ratio / (1 - b3**t)
        self.lr = min(self.lr0, self.lr0 * self.ratio_hat / t)
        self.mean, self.mean_hat = mean, mean / (1 - b1**t)
        self.variance, self.variance_hat, self.ratio = variance, variance_hat, ratio
        return self.lr

    def state(self) -> dict:
        return {
            "t": self.t,
            "mean": self.mean,
            "mean_hat": self.mean_hat,
            "variance": self.variance,
            "variance_hat": self.variance_hat,
            "ratio": self.ratio,
            "ratio_hat": self.ratio_hat,
            "lr": self.lr,
        }

    def load(self, state: dict) -> None:
        self.t = int(state["t"])
        self.mean = np.asarray(state["mean"], np.float64)
        self.mean_hat = np.asarray(state["mean_hat"], np.float64)
        for name in ("variance", "variance_hat", "ratio", "ratio_hat", "lr"):
            setattr(self, name, float(state[name]))


class AdaptiveFedAvg(FedAvg):
    """Adaptive-FedAvg (Canonaco et al., 2021): FedAvg with the server's adaptive client
    learning rate.

    Parameters beyond Flower's FedAvg: ``beta1``, ``beta2``, ``beta3`` (the moving
    averages of the parameters' mean, their variance and the variance ratio; FedCCFA's
    0.7, 0.3, 0.7) and ``update_every`` ("round" or "slot"). The starting rate lr0 is the
    experiment's ``[client] lr``.
    """

    def __init__(
        self,
        beta1: float = 0.7,
        beta2: float = 0.3,
        beta3: float = 0.7,
        update_every: Literal["round", "slot"] = "round",
        **kwargs,
    ) -> None:
        self.beta1 = check_fraction("beta1", beta1, allow_zero=True)
        self.beta2 = check_fraction("beta2", beta2, allow_zero=True)
        self.beta3 = check_fraction("beta3", beta3, allow_zero=True)
        self.update_every = check_choice("update_every", update_every, ("round", "slot"))
        super().__init__(**kwargs)
        self.rule: AdaptiveLearningRate | None = None  # made with lr0 when the first round is configured
        self.slot = 0

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        rule = self.rule.state() if self.rule is not None else {}
        return {"slot": self.slot, "lr0": self.rule.lr0 if self.rule else None, **rule}

    def load_state_dict(self, state: dict) -> None:
        self.slot = int(state["slot"])
        if state.get("lr0") is not None:
            self.rule = AdaptiveLearningRate(float(state["lr0"]), self.beta1, self.beta2, self.beta3)
            self.rule.load(state)

    # -- the round ------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.rule is None:
            self.rule = AdaptiveLearningRate(float(config.get(LR, 0.01)), self.beta1, self.beta2, self.beta3)
        slot = int(config.get(TIME_SLOT, 0))
        if self.update_every == "slot" and slot > self.slot:
            self.slot = slot
            self.rule.t = slot - 1  # one step per slot: t = s
            self.rule.step(parameter_vector(arrays))
        config[LR] = self.rule.lr
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        used = self.rule.lr if self.rule is not None else None
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.rule is None:
            return arrays, metrics
        if self.update_every == "round":
            self.rule.step(parameter_vector(arrays))
        metrics = MetricRecord(dict(metrics or {}))
        metrics["lr"] = float(used)
        metrics["next-lr"] = float(self.rule.lr)
        metrics["variance-ratio"] = float(self.rule.ratio_hat)
        return arrays, metrics
