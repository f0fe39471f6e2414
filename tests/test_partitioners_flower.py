"""fedsim partitioners behind Flower Datasets' Partitioner API, including FederatedDataset."""

from __future__ import annotations

import datasets  # installed with flwr-datasets, part of the test extra
import numpy as np
import pytest
from flwr_datasets import FederatedDataset

from partitioners import Dirichlet, DomainMixture, EmbeddingClusters
from partitioners.flower import FlowerPartitioner


def table(n: int = 300):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, n)
    return datasets.Dataset.from_dict(
        {
            "label": labels,
            "animal": np.array(["cat", "dog", "eel", "fox", "gnu"])[labels],
            "site": rng.integers(0, 3, n),
            "vector": rng.normal(size=(n, 4)).astype(np.float32),
        }
    )


def test_adapter_serves_the_same_split_as_fedsim():
    data = table()
    adapter = FlowerPartitioner(Dirichlet(6, alpha=0.3, min_size=5), "label", seed=4)
    adapter.dataset = data
    direct = Dirichlet(6, alpha=0.3, min_size=5).split(np.asarray(data["label"]), seed=4)
    assert adapter.num_partitions == 6
    for client in range(6):
        served = adapter.load_partition(client)
        assert np.array_equal(np.asarray(served["label"]), np.asarray(data["label"])[direct[client]])
    with pytest.raises(ValueError, match="partition_id"):
        adapter.load_partition(6)


def test_text_labels_domain_and_embedding_columns():
    data = table()
    by_name = FlowerPartitioner(Dirichlet(4, alpha=0.5, min_size=5), "animal", seed=1)
    by_name.dataset = data
    by_number = Dirichlet(4, alpha=0.5, min_size=5).split(np.asarray(data["label"]), seed=1)
    assert by_name.partition == by_number  # names numbered in sorted order: cat=0, dog=1, ...

    domains = FlowerPartitioner(DomainMixture(3, beta=0.1, sizes="equal", min_size=5), "label", domain_by="site")
    domains.dataset = data
    assert sum(len(domains.load_partition(i)) for i in range(3)) == 300

    clusters = FlowerPartitioner(EmbeddingClusters(3, clusters=3, min_size=5), "label", embedding_by="vector")
    clusters.dataset = data
    assert sorted(clusters.partition.groups) == ["cluster"]
    with pytest.raises(ValueError, match="domain_by"):
        FlowerPartitioner(DomainMixture(3), "label")


def test_federated_dataset_accepts_the_adapter(tmp_path):
    path = tmp_path / "train.csv"
    table().remove_columns(["vector"]).to_csv(str(path))
    adapter = FlowerPartitioner(Dirichlet(5, alpha=0.5, min_size=5), "label")
    federated = FederatedDataset(dataset="csv", data_files=str(path), partitioners={"train": adapter})
    parts = [federated.load_partition(i) for i in range(5)]
    assert sum(len(part) for part in parts) == 300
    assert all(len(part) >= 5 for part in parts)
