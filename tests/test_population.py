"""Lazy populations: clients whose data is made on demand from (data seed, client id).

A lazy Synthetic(alpha, beta) gives each client exactly the data of the in-memory one, a
run on it is bit-identical to the eager run, and 10,000,000 registered clients cost the
driver no memory per client and no work per round beyond the sampled ones.
"""

from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fedsim.build import load_experiment
from fedsim.cli import main
from fedsim.data import Dataset, load_dataset
from fedsim.data.population import Population, sample_clients
from fedsim.data.synthetic import SyntheticPopulation, load_synthetic
from fedsim.engine import InProcessEngine
from fedsim.errors import UserError
from fedsim.ordered_grid import NumberedNodes, OrderedGrid
from fedsim.runner import run_experiment
from fedsim.serverapp import Federation
from fedsim.splitting import describe_partition, split_dataset
from partitioners import NaturalPartitioner, Partition, PopulationPartition
from partitioners.base import ClientIndices
from strategies import FedAvg, FedProx

from .conftest import QUICKSTART

DEVICES = 12
LAZY = [
    "name=population",
    "dataset.name=synthetic",
    f"dataset.num_devices={DEVICES}",
    "dataset.samples_per_device=40",
    "dataset.min_samples=10",
    "partition.name=natural",
    f"partition.num_clients={DEVICES}",
    "model.name=mlp",
    "model.hidden=[16]",
    "strategy.fraction_train=0.5",
    "strategy.fraction_evaluate=0.5",
    "rounds=2",
    "client.lr=0.1",
]

# 10,000,000 registered clients of 20 samples each
TEN_MILLION = [
    "dataset.num_devices=10000000",
    "partition.num_clients=10000000",
    "dataset.size_distribution=equal",
    "dataset.samples_per_device=20",
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))


def population_experiment(*overrides: str):
    return load_experiment(QUICKSTART, [*LAZY, "dataset.lazy=true", *overrides])


# -- the data -------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"iid": True}, {"size_distribution": "equal", "samples_per_device": 9}])
def test_a_lazy_client_holds_exactly_the_in_memory_devices_data(options):
    options = {"num_devices": DEVICES, "samples_per_device": 40, "min_samples": 10, "seed": 3, **options}
    eager, lazy = load_synthetic(**options), load_synthetic(**options, lazy=True)
    assert isinstance(lazy, Population) and lazy.num_clients == DEVICES
    partition = NaturalPartitioner().split(eager.y_train, groups=eager.group_train)
    for client in range(DEVICES):
        x, y = lazy.client_samples(client)
        assert np.array_equal(x, eager.x_train[partition[client]]) and np.array_equal(
            y, eager.y_train[partition[client]]
        )
        assert lazy.client_size(client) == len(partition[client])
        assert x.dtype == np.float32 and y.dtype == np.int64
    # with no more devices than test_devices, the test split is every device's hold-out
    assert np.array_equal(lazy.x_test, eager.x_test) and np.array_equal(lazy.y_test, eager.y_test)
    assert (lazy.input_shape, lazy.classes, lazy.num_classes) == (eager.input_shape, eager.classes, 10)


def test_a_client_of_ten_million_is_the_same_as_of_a_dozen_and_nothing_is_kept_per_client():
    tracemalloc.start()
    try:
        huge = load_synthetic(num_devices=10_000_000, lazy=True, test_devices=50)
        held = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert held < 10_000_000, f"making a 10M population allocated {held / 1e6:.1f} MB"
    small = load_synthetic(num_devices=DEVICES, lazy=True)
    for client in (0, 7, 11):
        assert all(np.array_equal(a, b) for a, b in zip(huge.client_samples(client), small.client_samples(client)))
    x, y = huge.client_samples(9_999_999)
    assert len(y) == huge.client_size(9_999_999) >= 2 and x.shape == (len(y), 60)
    # the test split: 50 devices spread over the population, their hold-outs only
    assert 50 * 10 < len(huge.y_test) < 50 * 453 and huge.test_devices == 50
    with pytest.raises(ValueError, match="lazy = true"):
        load_synthetic(num_devices=10_000_000)
    with pytest.raises(ValueError, match="test_devices"):
        load_synthetic(num_devices=10, lazy=True, test_devices=0)
    with pytest.raises(ValueError, match="lazy"):
        load_synthetic(lazy="yes")


def test_client_samples_are_drawn_without_replacement_and_do_not_move_with_the_seed():
    ids = sample_clients(10_000_000, 1000)
    assert len(set(ids.tolist())) == 1000 and ids.max() < 10_000_000 and np.all(np.diff(ids) > 0)
    assert np.array_equal(ids, sample_clients(10_000_000, 1000))
    assert sample_clients(5, 1000).tolist() == [0, 1, 2, 3, 4]


# -- the partition ----------------------------------------------------------------------
def test_a_population_partition_is_a_count_and_refuses_what_needs_every_label(tmp_path):
    partition = PopulationPartition(10_000_000, 10)
    partition.save(tmp_path / "partition.npz")
    assert (tmp_path / "partition.npz").stat().st_size < 1000
    loaded = Partition.load(tmp_path / "partition.npz")
    assert isinstance(loaded, PopulationPartition) and loaded == partition and loaded.num_clients == 10_000_000
    assert loaded.slot_of(5) == 0 and not loaded.is_stream
    for refused in (lambda: loaded.sizes, lambda: loaded[3], lambda: loaded.view_at(3, 0), loaded.label_matrix):
        with pytest.raises(TypeError, match="population"):
            refused()


def test_a_natural_split_into_a_million_groups_keeps_no_array_per_client(tmp_path):
    """A large real dataset of natural groups (writers, speakers) is indexed lazily: one
    array of every index and one of offsets, each client's indices a view made on demand."""
    rng = np.random.default_rng(0)
    groups, y = rng.integers(0, 1_000_000, 3_000_000), rng.integers(0, 10, 3_000_000)
    tracemalloc.start()
    try:
        partition = NaturalPartitioner().split(y, groups=groups)
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # the indices (8 bytes a sample), the offsets (8 a client) and the labels: no array per client
    assert kept < 8 * 3_000_000 + 8 * 1_000_000 + 8 * 3_000_000 + 1_000_000, f"{kept / 1e6:.0f} MB kept"
    present = np.unique(groups)
    for client in (0, 4321, partition.num_clients - 1):
        assert np.array_equal(partition[client], np.flatnonzero(groups == present[client]))
    assert partition.sizes.sum() == 3_000_000 and len(partition.client_indices) == partition.num_clients
    partition.save(tmp_path / "natural.npz")
    loaded = Partition.load(tmp_path / "natural.npz")
    assert loaded == partition and isinstance(loaded.client_indices, ClientIndices)


def test_only_the_natural_split_applies_to_a_population():
    population = load_dataset("synthetic", num_devices=DEVICES, samples_per_device=40, min_samples=10, lazy=True)
    partition = split_dataset(population_experiment(), population)
    assert partition == PopulationPartition(DEVICES, 10)
    with pytest.raises(UserError, match=r'\[partition\] name = .dirichlet. .* name = "natural"'):
        split_dataset(population_experiment("partition.name=dirichlet", "partition.num_clients=4"), population)
    with pytest.raises(UserError, match=r"num_clients = 5 must equal the population's 12"):
        split_dataset(population_experiment("partition.num_clients=5"), population)


def test_the_skew_of_a_large_population_is_measured_on_a_sample_and_says_so(tmp_path, capsys):
    experiment = population_experiment("dataset.num_devices=3000", "partition.num_clients=3000")
    population = load_dataset("synthetic", **experiment.dataset.params)
    partition = split_dataset(experiment, population)
    report = describe_partition(experiment, population, partition, tmp_path)
    skew = json.loads((tmp_path / "skew.json").read_text())
    assert skew["sample"]["clients_measured"] == 1000 and skew["sample"]["clients_registered"] == 3000
    ids = skew["sample"]["client_ids"]
    assert len(ids) == 1000 and ids == sorted(set(ids)) and max(ids) < 3000
    assert len(skew["clients"]["hellinger"]) == 1000 and report.summary["num_clients"] == 1000
    # the sample's first client is population client ids[0], with its own labels
    labels = np.bincount(population.client_samples(ids[0])[1], minlength=10)
    assert skew["clients"]["size"][0] == labels.sum()
    assert "1,000 of 3,000 clients" in capsys.readouterr().err
    assert (tmp_path / "plots/partition_labels.png").stat().st_size > 0


def test_the_skew_of_an_in_memory_split_into_millions_of_clients_is_measured_on_a_sample(tmp_path, capsys):
    """A natural split of 250,000 writers: the measures and the heatmap cover 1,000 of them."""
    rng = np.random.default_rng(1)
    groups, y = rng.permutation(np.arange(600_000) % 250_000), rng.integers(0, 10, 600_000)
    partition = NaturalPartitioner().split(y, groups=groups)
    dataset = Dataset("writers", np.zeros((600_000, 1), np.float32), y, y[:5, None] * 0.0, y[:5], tuple("0123456789"))
    experiment = load_experiment(QUICKSTART, ["partition.name=natural", "partition.num_clients=250000"])
    report = describe_partition(experiment, dataset, partition, tmp_path)
    skew = json.loads((tmp_path / "skew.json").read_text())
    ids = skew["sample"]["client_ids"]
    assert skew["sample"]["clients_registered"] == 250_000 and len(ids) == 1000 == report.summary["num_clients"]
    assert skew["clients"]["size"][7] == len(partition[ids[7]])
    assert "1,000 of 250,000 clients" in capsys.readouterr().err


def test_fedsim_partition_on_ten_million_clients(tmp_path, capsys):
    args = [
        "partition",
        str(QUICKSTART),
        *[f"--set={o}" for o in LAZY],
        "--set=dataset.lazy=true",
        "--set=dataset.num_devices=10000000",
        "--set=partition.num_clients=10000000",
        "--set=dataset.test_devices=20",
        "--out",
        str(tmp_path / "p"),
    ]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "1,000 of 10,000,000 clients" in err and "mean Hellinger" in out
    assert Partition.load(tmp_path / "p/partition.npz") == PopulationPartition(10_000_000, 10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["partition.name=iid", "partition.num_clients=4"], "lazy population never holds"),
        (["features.name=efficientnet-lite0"], "lazy population never holds"),
        (["strategy.defence=fltrust"], "lazy population never holds"),
        (["dataset.lazy=false", "dataset.num_devices=2000000", "partition.num_clients=2000000"], "set lazy = true"),
    ],
)
def test_what_a_population_cannot_do_is_a_one_line_error(tmp_path, capsys, overrides, message):
    args = ["run", str(QUICKSTART), *[f"--set={o}" for o in [*LAZY, "dataset.lazy=true", *overrides]]]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


# -- runs -------------------------------------------------------------------------------
def test_a_lazy_run_is_bit_identical_to_the_in_memory_run(tmp_path):
    eager = load_experiment(QUICKSTART, LAZY)
    lazy = population_experiment()
    run_experiment(eager, tmp_path / "eager")
    run_experiment(lazy, tmp_path / "lazy")
    assert (tmp_path / "lazy/metrics.csv").read_bytes() == (tmp_path / "eager/metrics.csv").read_bytes()
    assert isinstance(Partition.load(tmp_path / "lazy/partition.npz"), PopulationPartition)


def test_attackers_among_ten_million_clients(tmp_path):
    """Attackers are drawn from the whole population, and model replacement's boost counts
    the round's examples, which a population gives client by client."""
    experiment = population_experiment(
        *TEN_MILLION,
        "dataset.test_devices=20",
        "strategy.fraction_train=0.000001",
        "strategy.fraction_evaluate=0.000001",
        "rounds=1",
        'attack=[{method = "model_replacement", target = 1, clients = [0]}, {method = "label_flip", target = 2, count = 2}]',
    )
    summary = run_experiment(experiment, tmp_path / "run").summary
    assert summary["num_clients"] == 10_000_000 and summary["rounds_completed"] == 1


def test_sampling_from_a_range_of_nodes_picks_flowers_clients_and_messages():
    class Listed:  # what Flower's strategies see from a grid that lists its nodes
        def __init__(self, nodes):
            self.nodes = nodes

        def get_node_ids(self):
            return list(self.nodes)

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            from flwr.app import Message

            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    class Ranged(Listed):  # fedsim's own grids: the nodes as a range, sampled without a list
        node_range = property(lambda self: self.nodes)

        def get_node_ids(self):
            raise AssertionError("a round on a range of nodes must not list them")

    nodes = range(100, 100 + 5000)
    arrays = ArrayRecord([np.zeros(3, np.float32)])
    for strategy in (FedAvg(fraction_train=0.01, fraction_evaluate=0.002), FedProx(proximal_mu=0.1)):
        for configure in ("configure_train", "configure_evaluate"):
            picked = []
            for grid in (Listed(nodes), Ranged(nodes)):
                random.seed(7)
                messages = list(getattr(strategy, configure)(3, arrays, ConfigRecord({"lr": 0.1}), grid))
                picked.append([(m.metadata.dst_node_id, dict(m.content["config"])) for m in messages])
            assert picked[0] == picked[1] and len(picked[0]) >= 10
            if configure == "configure_train" and isinstance(strategy, FedProx):
                assert picked[1][0][1]["proximal-mu"] == 0.1  # FedProx's term still travels


def test_numbered_nodes_map_a_node_to_its_client_without_storing_them():
    clients = NumberedNodes(1000, 10_000_000)
    assert clients[1000] == 0 and clients[10_000_999] == 9_999_999 and len(clients) == 10_000_000
    assert 1005 in clients and 999 not in clients and clients.get(5) is None
    with pytest.raises(KeyError):
        clients[10_001_000]
    grid = OrderedGrid(None, clients)
    assert grid.get_node_ids() == grid.node_range == range(1000, 10_001_000)
    assert OrderedGrid(None, {7: 1, 5: 0}).node_range is None


def test_ten_million_registered_clients_in_process_keep_no_memory_per_client(tmp_path, monkeypatch):
    """The driver's allocations over the whole engine run (grid, server loop, sampling,
    the clients' training), traced: far below one byte per registered client."""
    import torch._dynamo  # noqa: F401  (imported by the worker; slow to import under tracemalloc)

    experiment = population_experiment(
        *TEN_MILLION,
        "dataset.test_devices=50",
        "strategy.fraction_train=0.000002",  # 20 clients per round
        "strategy.fraction_evaluate=0.000001",
    )
    peaks = []
    execute = InProcessEngine.execute
    play_round = Federation.play_round

    def traced(self, *args):
        tracemalloc.start()
        try:
            execute(self, *args)
        finally:
            tracemalloc.stop()

    def measured(self, *args):
        tracemalloc.reset_peak()
        arrays = play_round(self, *args)
        peaks.append(tracemalloc.get_traced_memory()[1])
        return arrays

    monkeypatch.setattr(InProcessEngine, "execute", traced)
    monkeypatch.setattr(Federation, "play_round", measured)
    summary = run_experiment(experiment, tmp_path / "run").summary
    assert summary["num_clients"] == 10_000_000 and summary["rounds_completed"] == 2
    assert 0 <= summary["accuracy"] <= 1
    metrics = pd.read_csv(tmp_path / "run/metrics.csv", dtype={"id": str})
    trained = metrics[(metrics.scope == "client") & (metrics.metric == "train_loss")]
    assert trained.groupby("round").id.count().tolist() == [20, 20]
    assert trained.id.astype(int).max() > 100_000, "sampled from the whole population"
    # no round lists the registered clients: a list of 10M node ids alone is 80 MB
    assert len(peaks) == 2 and max(peaks) < 20_000_000, f"a round's peak {max(peaks) / 1e6:.0f} MB"


@pytest.mark.ray
def test_ten_million_registered_clients_on_ray_match_in_process(tmp_path):
    overrides = [
        *TEN_MILLION,
        "dataset.test_devices=20",
        "strategy.fraction_train=0.000001",
        "strategy.fraction_evaluate=0.000001",
        "rounds=1",
    ]
    run_experiment(population_experiment(*overrides), tmp_path / "local")
    on_ray = population_experiment(*overrides, "engine.name=ray", "engine.num_workers=2")
    assert run_experiment(on_ray, tmp_path / "ray").summary["num_clients"] == 10_000_000
    assert (tmp_path / "ray/metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()


def test_a_population_is_listed_in_its_repr():
    population = load_synthetic(num_devices=10_000_000, lazy=True, test_devices=5)
    assert isinstance(population, SyntheticPopulation)
    assert "num_clients=10,000,000" in repr(population)
