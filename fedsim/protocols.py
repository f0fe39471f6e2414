"""The hooks fedsim reads from the methods it runs, declared in one place.

A strategy is a Flower ``Strategy``; a client trainer a
:class:`fedsim.trainer.ClientTrainer`. Beyond those, fedsim asks each for optional hooks,
declared here as :class:`typing.Protocol`\\ s (runtime-checkable, so that fedsim asks with
``isinstance`` rather than by name), each with what fedsim does with it. A method declares
what it needs and can do; the core asks the declaration and never the class:

- :class:`StrategyClass`: what fedsim reads from a strategy *class* before any instance
  exists (its client trainer, the model options it insists on, whether its clients keep
  models of their own, a check of the model);
- :class:`SeveralModels`: a strategy that starts from several global models;
- :class:`Querying`: a strategy that asks its clients for statistics in rounds that do not
  train (GGEUR's class moments, FedDAA's prototypes);
- :class:`Stateful`: a strategy with state a checkpoint must keep (FoolsGold's histories);
- :class:`Filtering`: a defence that says which replies it accepted, so that a run can
  count its detections;
- :class:`Trainer`: a client trainer's hooks and the capabilities it declares (its clients
  can be vectorised; it takes several models; it clips its gradients).

The round observers' protocol is :class:`fedsim.observers.base.RoundObserver`, a sweep
backend's :class:`fedsim.sweep.plan.SweepBackend`, and what a defence takes from the
server is :meth:`strategies.defences.base.Defence.from_server`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from fedsim.clipping import AdaptiveClipping
from fedsim.trainer import ClientCall, ClientTrainer, QueryResult, RoundConfig, TrainResult


@runtime_checkable
class StrategyClass(Protocol):
    """Class attributes of a strategy that fedsim reads (each optional)."""

    client_trainer: type[ClientTrainer]
    """Its clients' trainer (default: FedAvg's, :class:`fedsim.trainer.ClientTrainer`)."""
    model_options: dict[str, Any]
    """Model options it needs (FedWon: ``norm = "none"``), filled in and checked."""
    personalized: bool
    """Whether clients keep models of their own: the run's headline is then the clients'
    own models on their held-out data, not the global model on the test split."""

    @staticmethod
    def validate_model(model: nn.Module) -> None:
        """Raise ValueError for a model the strategy cannot train (checked before a run)."""


@runtime_checkable
class SeveralModels(Protocol):
    """A strategy that starts from several global models (:mod:`fedsim.multimodel`)."""

    def initial_arrays(self, new_model: Callable[[int], ArrayRecord]) -> ArrayRecord:
        """The global arrays before round 1, from ``new_model(index)`` (one draw each)."""


@runtime_checkable
class Querying(Protocol):
    """A strategy with rounds that do not train: before training, the loop asks
    ``configure_query`` (as ``configure_train``) until it sends nothing, and hands each
    stage's replies to ``aggregate_query``; a client answers with its trainer's ``query``."""

    def configure_query(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_query(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None: ...


@runtime_checkable
class Stateful(Protocol):
    """A strategy whose state a checkpoint keeps: NumPy arrays and JSON data, never pickles."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Filtering(Protocol):
    """A defence's verdict on the last round's replies: ``last_accepted`` (node ids), a
    verdict on each client where ``filters`` is True (a rule that drops replies; one that
    only clips or reweights them sets it False, and reports no detections)."""

    last_accepted: list[int]
    filters: bool


@runtime_checkable
class Trainer(Protocol):
    """A client trainer's hooks (see :class:`fedsim.trainer.ClientTrainer`) and what it declares."""

    can_vectorize: bool
    """Whether ``[engine] vectorize`` may train its clients K at a time."""
    takes_several_models: bool
    """Whether it receives, and returns, a dict of named ArrayRecords."""

    def train(self, call: ClientCall) -> TrainResult: ...

    def query(self, call: ClientCall) -> QueryResult: ...

    def predict(self, call: ClientCall) -> torch.Tensor: ...

    def gradient_clipping(self, config: RoundConfig) -> AdaptiveClipping | None: ...
