"""The client side of an algorithm: what a client does with the global model.

A :class:`ClientTrainer` receives the model, its data view, the round's config and its
own persistent state, and returns arrays, metrics and new state. The default trainer is
FedAvg's client. A method that changes the client subclasses it and overrides only the
step that differs, and its Strategy names it in a ``client_trainer`` class attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

from fedsim.data import ClientData
from fedsim.training import batches, classification_metrics, predict

ClientState = dict[str, np.ndarray]
"""Per-client arrays kept between rounds (FedBN's BN layers, say); never sent."""


@dataclass(frozen=True)
class LocalSettings:
    """Local-training settings carried by the round's ConfigRecord.

    The server puts the experiment's ``[client]`` table into every train message, so a
    strategy can change them per round; Flower's FedProx adds ``proximal-mu``.
    """

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    proximal_mu: float = 0.0

    def to_config(self) -> dict[str, Any]:
        return {name.replace("_", "-"): value for name, value in vars(self).items() if name != "proximal_mu"}

    @classmethod
    def from_config(cls, config: ConfigRecord) -> LocalSettings:
        known = {name.replace("_", "-"): name for name in cls.__dataclass_fields__}
        return cls(**{known[k]: v for k, v in config.items() if k in known})


@dataclass
class TrainResult:
    arrays: ArrayRecord
    metrics: dict[str, float]
    state: ClientState = field(default_factory=dict)


class ClientTrainer:
    """FedAvg's client (McMahan et al., 2017): local epochs of SGD from the global weights.

    Honours Flower's FedProx (Li et al., 2020): a ``proximal-mu`` in the round's config
    adds (mu / 2) * ||w - w_global||^2 to every batch loss.
    """

    def receive(self, model: nn.Module, arrays: ArrayRecord, state: ClientState) -> None:
        """Load the server's arrays into the model."""
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)

    def make_optimizer(self, model: nn.Module, settings: LocalSettings) -> torch.optim.Optimizer:
        if settings.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        return torch.optim.SGD(
            model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        settings: LocalSettings,
        generator: torch.Generator,
        device: torch.device,
    ) -> dict[str, float]:
        """Run the local epochs; return the mean training loss and accuracy."""
        x = torch.as_tensor(data.x_train).to(device)
        y = torch.as_tensor(data.y_train).to(device)
        optimizer = self.make_optimizer(model, settings)
        anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else None
        model.train()
        total_loss, seen = 0.0, 0
        for _ in range(settings.local_epochs):
            for xb, yb in batches(x, y, settings.batch_size, generator):
                optimizer.zero_grad()
                loss = self.batch_loss(model, xb, yb)
                if anchor is not None:
                    drift = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
                    loss = loss + settings.proximal_mu / 2 * drift
                loss.backward()
                self.before_step(model)
                optimizer.step()
                total_loss += float(loss.detach()) * len(yb)
                seen += len(yb)
        return {"train_loss": total_loss / max(seen, 1)}

    def before_step(self, model: nn.Module) -> None:
        """Hook between backward and the optimizer step (gradient clipping, say)."""

    def send(self, model: nn.Module, state: ClientState) -> tuple[ArrayRecord, ClientState]:
        """What goes back to the server, and what the client keeps."""
        return ArrayRecord(model.state_dict()), state

    def train(
        self,
        model: nn.Module,
        arrays: ArrayRecord,
        data: ClientData,
        config: ConfigRecord,
        state: ClientState,
        generator: torch.Generator,
        device: torch.device,
    ) -> TrainResult:
        self.receive(model, arrays, state)
        model.to(device)
        metrics = self.fit(model, data, LocalSettings.from_config(config), generator, device)
        model.cpu()
        reply, state = self.send(model, state)
        return TrainResult(reply, metrics, state)

    def evaluate(
        self,
        model: nn.Module,
        arrays: ArrayRecord,
        data: ClientData,
        config: ConfigRecord,
        state: ClientState,
        device: torch.device,
    ) -> dict[str, float]:
        """Loss and accuracy of the model this client would use, on its held-out data."""
        self.receive(model, arrays, state)
        model.to(device)
        return classification_metrics(predict(model, data.x_test, device), data.y_test)
