"""Natural partitioning: one natural group per client, as LEAF and FedProx split their
benchmarks (a device of Synthetic(alpha, beta), a writer of FEMNIST, a speaker)."""

from __future__ import annotations

import numpy as np

from fedsim.checks import check_integer
from partitioners.base import Partition, Partitioner, check_group_ids, check_labels, indices_by_owner


class NaturalPartitioner(Partitioner):
    """One natural group per client (LEAF, Caldas et al. 2018; FedProx, Li et al. 2020).

    Client i holds every sample of the i-th group, groups in sorted order of the ids
    present; nothing is drawn, so the seed plays no part and every sample is dealt. The
    groups come from the dataset (``group_train``, such as the devices of ``synthetic``).

    Parameters
    ----------
    num_clients : int, optional
        None (the default) gives one client per group; a number must equal the number of
        groups, which guards an experiment against a dataset that changed under it.
    """

    requires = frozenset({"groups"})

    def __init__(self, num_clients: int | None = None) -> None:
        if num_clients is not None:
            check_integer("num_clients", num_clients, minimum=1)
        self.num_clients = num_clients

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        groups = check_group_ids("groups", groups, len(y))
        present, group_ids = np.unique(groups, return_inverse=True)
        if self.num_clients is not None and self.num_clients != len(present):
            raise ValueError(
                f"num_clients={self.num_clients} must equal the number of natural groups: the dataset "
                f"has {len(present)}; set num_clients={len(present)} or leave it out"
            )
        # The group is the client itself, so the partition keeps no "group" array: a
        # clients x groups matrix of it would be the identity, and quadratic in size.
        return Partition(indices_by_owner(group_ids, len(present)), y)
