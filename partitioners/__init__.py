"""Non-IID splits of a labelled dataset across federated clients.

Every scheme follows one contract (see :mod:`partitioners.base`)::

    partition = Dirichlet(num_clients=10, alpha=0.5).split(y, seed=0)
    partition[3]              # indices of client 3
    partition.label_matrix()  # clients x classes counts
    partition.skew()          # per-client Hellinger / Jensen-Shannon / EMD, Gini of sizes

Schemes that need more than labels say so in ``requires`` (``"domains"``,
``"embeddings"``, ``"groups"``). To use any of them from Flower Datasets, see :mod:`partitioners.flower`.
"""

from partitioners.base import ClientView, Partition, Partitioner
from partitioners.dirichlet import Dirichlet
from partitioners.domain import DomainMixture, DomainPerClient, LabelDomainSkew
from partitioners.drift import DriftPartitioner, DriftStream
from partitioners.embedders import EMBEDDERS, register_embedder
from partitioners.embedding import EmbeddingClusters
from partitioners.iid import IID
from partitioners.label import Pathological, Shards
from partitioners.mixture import LabelMixture
from partitioners.natural import NaturalPartitioner
from partitioners.population import PopulationPartition
from partitioners.quantity import QuantitySkew
from partitioners.skew import SkewReport, measure_skew

PARTITIONERS: dict[str, type[Partitioner]] = {
    "iid": IID,
    "dirichlet": Dirichlet,
    "pathological": Pathological,
    "shards": Shards,
    "quantity": QuantitySkew,
    "label-mixture": LabelMixture,
    "embedding": EmbeddingClusters,
    "domain": DomainPerClient,
    "domain-mixture": DomainMixture,
    "domain-lds": LabelDomainSkew,
    "natural": NaturalPartitioner,
    "drift": DriftPartitioner,
}

__all__ = [
    "EMBEDDERS",
    "PARTITIONERS",
    "ClientView",
    "Dirichlet",
    "DomainMixture",
    "DomainPerClient",
    "DriftPartitioner",
    "DriftStream",
    "EmbeddingClusters",
    "IID",
    "LabelDomainSkew",
    "LabelMixture",
    "NaturalPartitioner",
    "Partition",
    "Partitioner",
    "Pathological",
    "PopulationPartition",
    "QuantitySkew",
    "Shards",
    "SkewReport",
    "measure_skew",
    "register_embedder",
]
