"""Non-IID splits of a labelled dataset across federated clients.

Every scheme follows one contract (see :mod:`partitioners.base`)::

    partition = Dirichlet(num_clients=10, alpha=0.5).split(y, seed=0)
    partition[3]              # indices of client 3
    partition.label_matrix()  # clients x classes counts
"""

from partitioners.base import Partition, Partitioner
from partitioners.dirichlet import Dirichlet
from partitioners.iid import IID

PARTITIONERS: dict[str, type[Partitioner]] = {
    "iid": IID,
    "dirichlet": Dirichlet,
}

__all__ = ["PARTITIONERS", "Partition", "Partitioner", "Dirichlet", "IID"]
