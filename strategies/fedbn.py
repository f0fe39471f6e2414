"""FedBN (Li et al., ICLR 2021): BatchNorm layers stay on the clients.

Every BatchNorm parameter and buffer (weight, bias, running_mean, running_var,
num_batches_tracked) is kept in the client's persistent state across rounds and is never
sent; the server averages everything else. Each client evaluates its own model: the
shared weights plus its own BatchNorm layers. On a model without BatchNorm, FedBN is
FedAvg.

The server, which has no model, recognises BatchNorm arrays by name
(:func:`batchnorm_keys_by_name`). It sends with every message the shared arrays plus the
initial model's BatchNorm values, so every message is a complete model: a client with
BatchNorm of its own replaces those entries, and a client seen for the first time starts
from freshly initialised BatchNorm, as FedBN prescribes. It refuses a reply that carries
BatchNorm arrays, which a ClientApp without FedBN's client half sends: averaging them
would silently be FedAvg. The client half is :class:`FedBNTrainer` (fedsim's ClientApp,
and :func:`fedsim.plain_flower.client_app` for a plain Flower app), or
:func:`fedsim.plain_flower.fedbn_mod` around a ClientApp of your own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

from fedsim.checks import check_choice
from fedsim.models.norm import batchnorm_keys
from fedsim.trainer import ClientState, ClientTrainer
from strategies.fedavg import FedAvg

BATCHNORM_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def batchnorm_keys_by_name(keys: Iterable[str]) -> set[str]:
    """The BatchNorm entries among a state dict's keys, recognised by name where there is
    no model (:func:`fedsim.models.norm.batchnorm_keys` asks the model): a module prefix
    ``p`` is BatchNorm when ``p.running_mean`` is a key, and then its weight, bias,
    running_mean, running_var and num_batches_tracked are. A BatchNorm layer built with
    ``track_running_stats=False`` has no running_mean and is not recognised."""
    keys = set(keys)
    prefixes = {key.removesuffix("running_mean") for key in keys if key.split(".")[-1] == "running_mean"}
    return {prefix + entry for prefix in prefixes for entry in BATCHNORM_ENTRIES if prefix + entry in keys}


class FedBNTrainer(ClientTrainer):
    """FedAvg's local training; the BatchNorm layers stay in the client's state.

    The server's arrays are a complete model (FedBN's server sends the initial BatchNorm
    values with the shared arrays); a client that has BatchNorm of its own uses it instead.
    """

    def receive(self, model: nn.Module, arrays: ArrayRecord, state: ClientState) -> None:
        local = batchnorm_keys(model)
        incoming = arrays.to_torch_state_dict()
        own = {key: torch.as_tensor(state[key]) for key in local if key in state}
        missing = sorted(key for key in local if key not in incoming and key not in own)
        if missing:
            raise ValueError(
                f"FedBN: the server sent no BatchNorm values for a client without its own ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}); strategies.fedbn.FedBN sends them with every message"
            )
        # strict: the model is reused by every client a worker runs, so all of it is set here
        model.load_state_dict({**incoming, **own}, strict=True)

    def send(self, model: nn.Module, state: ClientState) -> tuple[ArrayRecord, ClientState]:
        local = batchnorm_keys(model)
        weights = model.state_dict()
        shared = ArrayRecord({key: Array(value.cpu().numpy()) for key, value in weights.items() if key not in local})
        return shared, {key: weights[key].cpu().numpy().copy() for key in local}


class FedBN(FedAvg):
    """FedBN (Li et al., ICLR 2021): average all but BatchNorm; clients keep their own BN.

    ``weighting = "uniform"`` (the authors' choice) gives every client the same weight in
    the average; ``"samples"`` weights by training examples as FedAvg does.

    The first ``configure_train`` or ``configure_evaluate`` remembers the BatchNorm arrays
    of the arrays it is given (the initial model's) in ``initial_batchnorm``; every message
    then carries the shared arrays plus those. ``aggregate_train`` raises ValueError on a
    reply that carries BatchNorm arrays.
    """

    client_trainer = FedBNTrainer
    personalized = True  # the global arrays alone are not a model any client uses
    initial_batchnorm: ArrayRecord | None = None  # the initial model's BN arrays, once seen
    initial_order: list[str] | None = None  # the initial model's keys, in order

    @staticmethod
    def validate_model(model: nn.Module) -> None:
        """FedBN on a model without BatchNorm would silently be FedAvg."""
        if not batchnorm_keys(model):
            raise ValueError(
                "the model has no BatchNorm layers, so FedBN would be FedAvg; choose a model with norm = 'bn'"
            )

    def __init__(self, *, weighting: Literal["uniform", "samples"] = "uniform", **kwargs) -> None:
        super().__init__(**kwargs)
        check_choice("weighting", weighting, ("uniform", "samples"))
        self.weighting = weighting

    def with_initial_batchnorm(self, arrays: ArrayRecord) -> ArrayRecord:
        """The shared arrays plus the initial model's BatchNorm values, in the initial
        model's order: a complete model for any client."""
        if self.initial_batchnorm is None:
            batchnorm = batchnorm_keys_by_name(arrays.keys())
            self.initial_batchnorm = ArrayRecord({key: arrays[key] for key in arrays.keys() if key in batchnorm})
            self.initial_order = list(arrays.keys())
        initial = self.initial_batchnorm
        known = set(self.initial_order)
        order = [*self.initial_order, *(key for key in arrays.keys() if key not in known)]
        complete = {}
        for key in order:
            if key in initial:
                complete[key] = initial[key]
            elif key in arrays:
                complete[key] = arrays[key]
        return ArrayRecord(complete)

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this strategy: the initial BatchNorm values it sends."""
        if self.initial_batchnorm is None:
            return {}
        return {"initial_batchnorm": self.initial_batchnorm, "initial_order": list(self.initial_order or [])}

    def load_state_dict(self, state: dict) -> None:
        self.initial_batchnorm = state.get("initial_batchnorm")
        self.initial_order = state.get("initial_order")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(server_round, self.with_initial_batchnorm(arrays), config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, self.with_initial_batchnorm(arrays), config, grid)

    @staticmethod
    def refuse_batchnorm(replies: list[Message]) -> None:
        """A reply with BatchNorm arrays comes from a ClientApp that does not keep them
        local: averaging it would silently be FedAvg."""
        for reply in replies:
            if reply.has_error():
                continue
            for record in reply.content.array_records.values():
                found = sorted(batchnorm_keys_by_name(record.keys()))
                if found:
                    raise ValueError(
                        f"FedBN: the reply of node {reply.metadata.src_node_id} carries BatchNorm arrays "
                        f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): its ClientApp does not keep "
                        "BatchNorm local, and averaging them would be FedAvg. Use fedsim's ClientApp, "
                        "fedsim.plain_flower.client_app(FedBN, model_fn, data_fn), or add "
                        "fedsim.plain_flower.fedbn_mod to your ClientApp's mods"
                    )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.refuse_batchnorm(replies)
        if self.weighting == "samples":
            return super().aggregate_train(server_round, replies)
        # FedAvg's aggregation with every client's arrays weighted equally; metrics keep
        # FedAvg's weighting by examples.
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [reply.content for reply in valid]
        equal = [
            RecordDict({"arrays": next(iter(content.array_records.values())), "weight": MetricRecord({"w": 1})})
            for content in contents
        ]
        return aggregate_arrayrecords(equal, "w"), self.train_metrics_aggr_fn(contents, self.weighted_by_key)
