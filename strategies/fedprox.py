"""FedProx (Li et al., MLSys 2020): Flower's own strategy, with ``proximal_mu`` required.

The server sends ``proximal-mu`` in every train config; the default client trainer adds
(mu / 2) * ||w - w_global||^2 to its loss when it sees it. Flower's class defaults to
mu = 0, which is FedAvg under another name (an easy way to compare FedAvg with itself), so
fedsim's ``fedprox`` asks for ``proximal_mu`` under ``[strategy]`` (the paper tries 0.001
to 1; 0 is allowed when written out, for ablations).
"""

from typing import Annotated

from flwr.serverapp.strategy import FedProx as FlowerFedProx
from pydantic import Field


class FedProx(FlowerFedProx):
    """FedProx (Li et al., MLSys 2020): FedAvg whose clients add a proximal term (mu / 2) ||w - w_global||^2."""

    def __init__(self, *, proximal_mu: Annotated[float, Field(ge=0)], **kwargs) -> None:
        super().__init__(proximal_mu=proximal_mu, **kwargs)


__all__ = ["FedProx"]
