"""FedAvg (McMahan et al., AISTATS 2017): Flower's own strategy.

Clients run local SGD epochs from the global weights; the server averages the returned
weights, weighted by each client's number of training examples. The client side is
:class:`fedsim.trainer.ClientTrainer`, the default. fedsim's other strategies build on this
class rather than on Flower's, so that in a Flower app of your own each round samples from
the nodes online (:mod:`strategies.flower_start`).
"""

from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies.flower_start import StartsOnceNodesAreOnline


class FedAvg(StartsOnceNodesAreOnline, FlowerFedAvg):
    """FedAvg (McMahan et al., AISTATS 2017): Flower's own strategy.

    Only ``start`` differs from Flower's class: in a Flower app of your own it waits until
    ``min_available_nodes`` nodes are online before it configures a round
    (:mod:`strategies.flower_start`).
    """


__all__ = ["FedAvg"]
