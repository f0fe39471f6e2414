"""The client side of an algorithm: what a client does with the global model.

A :class:`ClientTrainer`'s hooks (``train``, ``query``, ``predict``) receive one
:class:`ClientCall`: the model, the server's arrays, the client's data view, the round's
config, its own persistent state, the round's generator and the device; ``train`` returns
arrays, metrics and new state. The model is the
worker's, reused by every client it runs (:class:`fedsim.worker.Worker`), so
:meth:`ClientTrainer.receive` must set all of its parameters and buffers (a strict
``load_state_dict`` does); it stays on the worker's device. The default trainer is
FedAvg's client. A method that changes the client subclasses it and overrides only the
step that differs, and its Strategy names it in a ``client_trainer`` class attribute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

from fedsim.clipping import AdaptiveClipping
from fedsim.data import ClientData
from fedsim.errors import UserError
from fedsim.training import batches, predict

SERVER_ROUND = "server-round"  # the key Flower's strategies use for the round number
TIME_SLOT = "time-slot"  # the round's slot of a drift stream (0 on a static partition), in every config fedsim sends
# the records of a client's reply, and the metric by which Flower's strategies weight it
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES = "num-examples"
# an evaluate reply's correct predictions and samples per domain, for accuracy by domain
DOMAIN_CORRECT = "domain-correct"
DOMAIN_COUNT = "domain-count"
# a query reply's drift verdict (FedDAA's detection), which the stream metrics score
DRIFT_FROM_SLOT = "drift-from-slot"
REAL_DRIFT = "real-drift"

ClientState = dict[str, np.ndarray]
"""Per-client arrays kept between rounds (FedBN's BN layers, say); never sent."""


@dataclass(frozen=True)
class RoundConfig:
    """A round's ConfigRecord, read once: local-training settings plus method parameters.

    The server puts the experiment's ``[client]`` table into every train message (so a
    strategy may change it per round) and Flower injects ``server-round``. Anything else a
    strategy sends (FedProx's ``proximal-mu``, a method's own keys) is in ``extra``. The
    ClientApp adds ``client``, the id of the client that received it, so that a trainer
    knows who and when it is (attacks, faults and drift need both), and ``seed``, the
    experiment's seed, for draws a client makes once and reuses across rounds (GGEUR's
    generated embeddings).
    """

    server_round: int = 0
    client: int | None = None  # who trains: set by the ClientApp, never sent
    seed: int = 0  # the experiment's seed: set by the ClientApp, never sent
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def proximal_mu(self) -> float:
        return float(self.extra.get("proximal-mu", 0.0))

    def to_config(self) -> ConfigRecord:
        """The local-training settings as ConfigRecord entries (``server-round`` is Flower's)."""
        local = ("server_round", "client", "seed", "extra")
        settings = {key.replace("_", "-"): value for key, value in vars(self).items() if key not in local}
        return ConfigRecord({**settings, **self.extra})

    @classmethod
    def from_config(cls, config: ConfigRecord, client: int | None = None, seed: int = 0) -> RoundConfig:
        """Read a round's ConfigRecord, as received by ``client`` in an experiment with ``seed``."""
        local = ("extra", "client", "seed")
        fields = {name.replace("_", "-"): name for name in cls.__dataclass_fields__ if name not in local}
        known = {fields[key]: value for key, value in config.items() if key in fields}
        extra = {key: value for key, value in config.items() if key not in fields}
        return cls(**known, client=client, seed=seed, extra=extra)


@dataclass
class TrainResult:
    arrays: ArrayRecord | dict[str, ArrayRecord]  # several named models: fedsim.multimodel
    metrics: dict[str, float]
    state: ClientState = field(default_factory=dict)


@dataclass
class QueryResult:
    """A client's answer to a strategy's query (a round that does not train): metrics
    (numbers, or lists of numbers) and statistics as arrays. It changes no client state,
    so a resumed run asks again and gets the same answer."""

    metrics: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientCall:
    """One call of a trainer hook for one client: the worker's ``model`` (reused by every
    client the worker runs), the ``arrays`` the server sent (a dict of named records for a
    several-model strategy), the client's ``data`` in this round, the round's ``config``
    (with the client's id and the round), its persistent ``state``, the round's
    ``generator`` (None for a call that draws nothing: a query, a prediction) and the
    ``device``. :meth:`replace` gives the call with some of them changed (a method that
    trains on augmented data, say)."""

    model: nn.Module
    arrays: Any
    data: ClientData
    config: RoundConfig
    state: ClientState
    generator: torch.Generator | None
    device: torch.device

    def replace(self, **changes: Any) -> ClientCall:
        return dataclasses.replace(self, **changes)


class ClientTrainer:
    """FedAvg's client (McMahan et al., 2017): local epochs of SGD from the global weights.

    Honours Flower's FedProx (Li et al., 2020): a ``proximal-mu`` in the round's config
    adds (mu / 2) * ||w - w_global||^2 to every batch loss.

    A trainer for a strategy with several global models (:mod:`fedsim.multimodel`) sets
    ``takes_several_models``: it then receives, and returns, a dict of named ArrayRecords.

    ``can_vectorize``: whether ``[engine] vectorize`` may train this trainer's clients K at
    a time (:mod:`fedsim.vectorize`). A subclass whose local training the vectorised loop
    would not reproduce declares False; one that overrides ``fit``, ``batch_loss``,
    ``before_step``, ``make_optimizer`` or ``train`` is refused anyway, unless the loop
    knows the override (:func:`fedsim.vectorize.vectorizable`).
    """

    takes_several_models: bool = False
    can_vectorize: bool = True

    def receive(self, model: nn.Module, arrays: ArrayRecord, state: ClientState) -> None:
        """Load the server's arrays into the model."""
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)

    def make_optimizer(self, model: nn.Module, config: RoundConfig) -> torch.optim.Optimizer:
        if config.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def gradient_clipping(self, config: RoundConfig) -> AdaptiveClipping | None:
        """The gradient clipping this trainer applies before every step (FedWon's adaptive
        clipping), or None. A trainer declares it here rather than in :meth:`before_step`,
        so that the vectorised loop (:mod:`fedsim.vectorize`) clips K clients as it would."""
        return None

    def before_step(self, model: nn.Module, config: RoundConfig) -> None:
        """Hook between backward and the optimizer step: the declared gradient clipping."""
        clipping = self.gradient_clipping(config)
        if clipping is not None:
            clipping.apply(model)

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        config: RoundConfig,
        generator: torch.Generator,
        device: torch.device,
    ) -> dict[str, float]:
        """Run the local epochs; return the mean training loss (and the clipping threshold
        applied, where the trainer declares one that is reported)."""
        clipping = self.gradient_clipping(config)  # a trainer that cannot clip fails before training
        x = torch.as_tensor(data.x_train).to(device)
        y = torch.as_tensor(data.y_train).to(device)
        optimizer = self.make_optimizer(model, config)
        mu = config.proximal_mu
        anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
        # BatchNorm1d cannot normalise one sample: a trailing batch of one is skipped, and
        # batch_size = 1 is refused with a message that says what to change.
        single_sample_breaks = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
        if single_sample_breaks and config.batch_size == 1:
            raise UserError(
                "[client] batch_size = 1 cannot train the model's BatchNorm1d layers; "
                "use a larger batch_size or [model] norm = 'gn', 'ln' or 'none'"
            )
        model.train()
        total_loss, seen = 0.0, 0
        for _ in range(config.local_epochs):
            for xb, yb in batches(x, y, config.batch_size, generator):
                if single_sample_breaks and len(yb) == 1:
                    continue
                optimizer.zero_grad()
                loss = self.batch_loss(model, xb, yb)
                if anchor is not None:
                    drift = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
                    loss = loss + mu / 2 * drift
                loss.backward()
                self.before_step(model, config)
                optimizer.step()
                total_loss += float(loss.detach()) * len(yb)
                seen += len(yb)
        metrics = {"train_loss": total_loss / max(seen, 1)}
        if clipping is not None and clipping.metric is not None:
            metrics[clipping.metric] = clipping.threshold
        return metrics

    def send(self, model: nn.Module, state: ClientState) -> tuple[ArrayRecord, ClientState]:
        """What goes back to the server, and what the client keeps (as CPU arrays: the
        model may be on a GPU)."""
        return ArrayRecord(model.state_dict()), state

    def train(self, call: ClientCall) -> TrainResult:
        """A round of local training: receive, fit, send."""
        self.receive(call.model, call.arrays, call.state)
        call.model.to(call.device)
        metrics = self.fit(call.model, call.data, call.config, call.generator, call.device)
        reply, state = self.send(call.model, call.state)
        return TrainResult(reply, metrics, state)

    def query(self, call: ClientCall) -> QueryResult:
        """Answer a strategy's query (``configure_query``): statistics of the client's data
        or of the model on it. A trainer whose strategy asks overrides this."""
        raise NotImplementedError(f"{type(self).__name__} answers no queries; its strategy should not send any")

    def predict(self, call: ClientCall) -> torch.Tensor:
        """Logits, on the client's held-out data, of the model this client would use.

        The ClientApp turns them into loss, accuracy and per-domain accuracy, the same way
        for every method, so that methods stay comparable.
        """
        self.receive(call.model, call.arrays, call.state)
        call.model.to(call.device)
        return predict(call.model, call.data.x_test, call.device)
