"""FedProx (Li et al., MLSys 2020): Flower's own strategy, registered as is.

The server sends ``proximal-mu`` in every train config; the default client trainer adds
(mu / 2) * ||w - w_global||^2 to its loss when it sees it. Set ``proximal_mu`` under
``[strategy]``.
"""

from flwr.serverapp.strategy import FedProx

__all__ = ["FedProx"]
