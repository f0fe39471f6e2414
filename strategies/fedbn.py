"""FedBN (Li et al., ICLR 2021): BatchNorm layers stay on the clients.

Every BatchNorm parameter and buffer (weight, bias, running_mean, running_var,
num_batches_tracked) is kept in the client's persistent state across rounds and is never
sent; the server averages everything else. Each client evaluates its own model: the
shared weights plus its own BatchNorm layers. On a model without BatchNorm, FedBN is
FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

from fedsim.models.norm import batchnorm_keys
from fedsim.trainer import ClientState, ClientTrainer


class FedBNTrainer(ClientTrainer):
    """FedAvg's local training, with the BatchNorm layers taken from and kept in the
    client's state instead of the server's arrays."""

    def receive(self, model: nn.Module, arrays: ArrayRecord, state: ClientState) -> None:
        local = batchnorm_keys(model)
        incoming = arrays.to_torch_state_dict()
        if not state:
            # This client's first message: it has no BatchNorm of its own yet, so BN starts
            # from a freshly built layer's values (after round 1 the server's arrays hold
            # none, and the worker's model holds the previous client's).
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_parameters()
            missing, unexpected = model.load_state_dict(incoming, strict=False)
            if unexpected or set(missing) - local:
                raise ValueError(
                    f"the server's arrays do not fit the model: missing {missing}, unexpected {unexpected}"
                )
            return
        shared = {key: value for key, value in incoming.items() if key not in local}
        own = {key: torch.as_tensor(state[key]) for key in local}
        model.load_state_dict({**shared, **own}, strict=True)

    def send(self, model: nn.Module, state: ClientState) -> tuple[ArrayRecord, ClientState]:
        local = batchnorm_keys(model)
        weights = model.state_dict()
        shared = ArrayRecord({key: Array(value.cpu().numpy()) for key, value in weights.items() if key not in local})
        return shared, {key: weights[key].cpu().numpy().copy() for key in local}


class FedBN(FedAvg):
    """FedBN (Li et al., ICLR 2021): average all but BatchNorm; clients keep their own BN.

    ``weighting = "uniform"`` (the authors' choice) gives every client the same weight in
    the average; ``"samples"`` weights by training examples as FedAvg does.
    """

    client_trainer = FedBNTrainer
    personalized = True  # the global arrays alone are not a model any client uses

    @staticmethod
    def validate_model(model: nn.Module) -> None:
        """FedBN on a model without BatchNorm would silently be FedAvg."""
        if not batchnorm_keys(model):
            raise ValueError(
                "the model has no BatchNorm layers, so FedBN would be FedAvg; choose a model with norm = 'bn'"
            )

    def __init__(self, *, weighting: Literal["uniform", "samples"] = "uniform", **kwargs) -> None:
        super().__init__(**kwargs)
        if weighting not in ("uniform", "samples"):
            raise ValueError(f"weighting must be 'uniform' or 'samples', got {weighting!r}")
        self.weighting = weighting

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
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
