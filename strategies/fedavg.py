"""FedAvg (McMahan et al., AISTATS 2017): Flower's own strategy, registered as is.

Clients run local SGD epochs from the global weights; the server averages the returned
weights, weighted by each client's number of training examples. The client side is
:class:`fedsim.trainer.ClientTrainer`, the default.
"""

from flwr.serverapp.strategy import FedAvg

__all__ = ["FedAvg"]
