"""Federated algorithms: one module per method, each an ordinary Flower Strategy.

A strategy whose clients do something other than FedAvg's local SGD names its client
trainer (a :class:`fedsim.trainer.ClientTrainer` subclass) in a ``client_trainer`` class
attribute. Two more optional class attributes tell fedsim about the method:
``model_options`` (model options it requires, e.g. FedWon's ``{"norm": "none"}``) and
``personalized = True`` (clients evaluate their own models, so the global arrays are not
evaluated on the server), and a ``validate_model(model)`` static method that raises
ValueError for a model the method cannot train (FedBN: no BatchNorm). Every class here can be dropped into a plain Flower ServerApp.
"""

from strategies.fedavg import FedAvg
from strategies.fedbn import FedBN
from strategies.fedprox import FedProx
from strategies.fedwon import FedWon

STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedbn": FedBN,
    "fedwon": FedWon,
}

__all__ = ["STRATEGIES", "FedAvg", "FedBN", "FedProx", "FedWon"]
