"""Federated algorithms: one module per method, each an ordinary Flower Strategy.

A strategy whose clients do something other than FedAvg's local SGD names its client
trainer (a :class:`fedsim.trainer.ClientTrainer` subclass) in a ``client_trainer`` class
attribute. Every class here can be dropped into a plain Flower ServerApp.
"""

from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx

STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
}

__all__ = ["STRATEGIES", "FedAvg", "FedProx"]
