"""The shared machinery of strategies with several global models (IFCA, FedDAA, the oracle).

The server keeps its K models packed in one ArrayRecord (:mod:`fedsim.multimodel`), sends
them to each sampled client as K named records (``model.0`` ... ``model.K-1``), and
averages each model over the clients that trained it, weighted by how much of its data
each client gave that model: the reply metric ``weight-k`` (the number of examples a
hard choice assigns to model k, or a soft assignment's total weight). A client replies
with the models it trained, and reports a weight for every model (0 for the others), so
that every reply carries the same metric keys. A model that no client trained in a round
stays as it was.

The client half, :class:`SeveralModelsTrainer`, loads each model in turn into the
worker's one model object; subclasses say which model(s) to train on which data
(:meth:`SeveralModelsTrainer.train_models`) and how to predict
(:meth:`SeveralModelsTrainer.predict_models`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

from fedsim import multimodel
from fedsim.checks import check_integer
from fedsim.data import ClientData
from fedsim.trainer import NUM_EXAMPLES, ClientCall, ClientState, ClientTrainer, RoundConfig, TrainResult
from fedsim.training import predict
from strategies.fedavg import FedAvg


def weight_key(index: int) -> str:
    return f"weight-{index}"


class SeveralModelsTrainer(ClientTrainer):
    """A client of a several-model strategy: it receives a dict of named model records."""

    can_vectorize = False  # each client trains several models, or picks one, per round
    takes_several_models = True

    def train(self, call: ClientCall) -> TrainResult:
        models = multimodel.ordered(call.arrays)
        trained, weights, metrics, state = self.train_models(call, models)
        reply = {multimodel.model_name(k): record for k, record in trained.items()}
        metrics = {**metrics, **{weight_key(k): float(weights[k]) for k in range(len(models))}}
        return TrainResult(reply, metrics, state)

    def train_models(
        self, call: ClientCall, models: list[ArrayRecord]
    ) -> tuple[dict[int, ArrayRecord], np.ndarray, dict[str, float], ClientState]:
        """Train on ``models`` (the call's records, in order); return the trained models by
        index, a weight per model, metrics and the client's new state."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_models")

    def predict(self, call: ClientCall) -> torch.Tensor:
        return self.predict_models(call, multimodel.ordered(call.arrays))

    def predict_models(self, call: ClientCall, models: list[ArrayRecord]) -> torch.Tensor:
        """Logits on the client's held-out data."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict_models")

    # -- helpers for subclasses ---------------------------------------------------------
    def train_one(
        self,
        model: nn.Module,
        record: ArrayRecord,
        data: ClientData,
        config: RoundConfig,
        generator: torch.Generator,
        device: torch.device,
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """FedAvg's local training of one of the models."""
        self.receive(model, record, {})
        model.to(device)
        metrics = self.fit(model, data, config, generator, device)
        return ArrayRecord(model.state_dict()), metrics

    def logits_of(self, model: nn.Module, record: ArrayRecord, x: np.ndarray, device: torch.device) -> torch.Tensor:
        """One model's logits on ``x`` (CPU tensor)."""
        self.receive(model, record, {})
        model.to(device)
        return predict(model, x, device)


def average_numbers(replies: list[Message]) -> MetricRecord:
    """The replies' numeric train metrics, averaged by examples; lists (FedDAA's label
    counts) are the strategy's own business, and a client's choices stay in its rows."""
    weights = [float(reply.content["metrics"].get(NUM_EXAMPLES, 0)) for reply in replies]
    total = sum(weights) or 1.0
    keys = {
        key
        for reply in replies
        for key, value in reply.content["metrics"].items()
        if isinstance(value, (int, float)) and key != NUM_EXAMPLES
    }
    return MetricRecord(
        {
            key: sum(float(r.content["metrics"].get(key, 0.0)) * w for r, w in zip(replies, weights)) / total
            for key in sorted(keys)
        }
    )


class SeveralModels(FedAvg):
    """FedAvg over K global models: see the module docstring.

    Parameters beyond Flower's FedAvg: ``num_models`` (K).
    """

    client_trainer: type[ClientTrainer] = SeveralModelsTrainer
    personalized = True  # each client predicts with the model(s) it picks

    def __init__(self, num_models: int = 4, **kwargs) -> None:
        check_integer("num_models", num_models, minimum=1)
        super().__init__(**kwargs)
        self.num_models = num_models
        self.current: list[ArrayRecord] = []

    def initial_arrays(self, new_model: Callable[[int], ArrayRecord]) -> ArrayRecord:
        """K models, each with its own random initialisation (IFCA's; a shared start
        would leave the models identical until the clients' choices split them)."""
        return multimodel.pack([new_model(k) for k in range(self.num_models)])

    def _models(self, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        models = self.packed_models(arrays)
        self.current = list(models.values())
        return models

    def packed_models(self, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """The named models in ``arrays``; a single model's arrays are a mistake, said plainly."""
        if not multimodel.is_packed(arrays):
            raise ValueError(
                f"{type(self).__name__} keeps {self.num_models} models packed in one ArrayRecord "
                "(fedsim.multimodel.pack); start it from initial_arrays(new_model), not from one model's arrays"
            )
        return multimodel.unpack(arrays)

    def _with_models(self, messages: Iterable[Message], arrays: ArrayRecord, train: bool) -> list[Message]:
        """Flower's messages, each carrying the models by name and its node's config."""
        models = self._models(arrays)
        out = []
        for message in messages:
            config = message.content[self.configrecord_key]
            if train:
                config = self.client_config(message.metadata.dst_node_id, config)
            content = RecordDict({**models, self.configrecord_key: config})
            out.append(Message(content=content, metadata=message.metadata))
        return out

    def client_config(self, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """One sampled node's train config: the round's, unless a subclass adds to it
        (FedDAA: that client's drift verdict)."""
        return config

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self._with_models(super().configure_train(server_round, arrays, config, grid), arrays, train=True)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self._with_models(super().configure_evaluate(server_round, arrays, config, grid), arrays, train=False)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [reply for reply in replies if not reply.has_error()]
        if not replies or not self.current:
            return None, None
        models = []
        for k, previous in enumerate(self.current):
            name = multimodel.model_name(k)
            contributions = [
                RecordDict({name: reply.content[name], "w": MetricRecord({"w": weight})})
                for reply in replies
                if name in reply.content.array_records
                and (weight := float(reply.content["metrics"].get(weight_key(k), 0.0))) > 0
            ]
            models.append(aggregate_arrayrecords(contributions, "w") if contributions else previous)
        return multimodel.pack(models), average_numbers(replies)
