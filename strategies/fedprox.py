"""FedProx (Li et al., MLSys 2020): Flower's own strategy, with ``proximal_mu`` required.

The server sends ``proximal-mu`` in every train config; the default client trainer adds
(mu / 2) * ||w - w_global||^2 to its loss when it sees it. Flower's class defaults to
mu = 0, which is FedAvg under another name (an easy way to compare FedAvg with itself), so
fedsim's ``fedprox`` asks for ``proximal_mu`` under ``[strategy]`` (the paper tries 0.001
to 1; 0 is allowed when written out, for ablations).
"""

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx as FlowerFedProx

from fedsim.checks import check_number
from strategies.flower_start import StartsOnceNodesAreOnline


class FedProx(StartsOnceNodesAreOnline, FlowerFedProx):
    """FedProx (Li et al., MLSys 2020): FedAvg whose clients add a proximal term (mu / 2) ||w - w_global||^2."""

    def __init__(self, *, proximal_mu: float, **kwargs) -> None:
        super().__init__(proximal_mu=check_number("proximal_mu", proximal_mu, at_least=0), **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        # Flower's FedProx adds the term's weight here, but a round on fedsim's grids samples
        # before Flower's class is reached (strategies.flower_start): add it first
        config["proximal-mu"] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)


__all__ = ["FedProx"]
