"""IFCA (Ghosh et al., NeurIPS 2020): K global models; each client trains the one with
the lowest loss on its local data.

Every round a sampled client evaluates all K models on its training data, picks the one
with the lowest mean loss (ties: the lowest index), trains that one with FedAvg's local
SGD and sends it back; the server averages each model over the clients that picked it,
weighted by their training examples (IFCA's "model averaging" variant). The K models
start from K independent random initialisations. A client predicts with the model it
would pick now (the lowest loss on its training data).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.data import ClientData
from fedsim.trainer import ClientCall
from strategies.clustered import SeveralModels, SeveralModelsTrainer


class IFCATrainer(SeveralModelsTrainer):
    """Pick the model with the lowest training loss, train it alone."""

    def choose(self, model: nn.Module, models: list[ArrayRecord], data: ClientData, device: torch.device) -> int:
        y = torch.as_tensor(data.y_train)
        losses = [
            float(nn.functional.cross_entropy(self.logits_of(model, record, data.x_train, device), y))
            for record in models
        ]
        return int(np.argmin(losses))

    def train_models(self, call: ClientCall, models: list[ArrayRecord]):
        model, data, device = call.model, call.data, call.device
        chosen = self.choose(model, models, data, device)
        trained, metrics = self.train_one(model, models[chosen], data, call.config, call.generator, device)
        weights = np.zeros(len(models))
        weights[chosen] = data.num_train
        return {chosen: trained}, weights, {**metrics, "cluster": float(chosen)}, call.state

    def predict_models(self, call: ClientCall, models: list[ArrayRecord]) -> torch.Tensor:
        model, data, device = call.model, call.data, call.device
        return self.logits_of(model, models[self.choose(model, models, data, device)], data.x_test, device)


class IFCA(SeveralModels):
    """IFCA (Ghosh et al., 2020): ``num_models`` global models, hard choice by local loss."""

    client_trainer = IFCATrainer
