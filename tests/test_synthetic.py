"""FedProx's Synthetic(alpha, beta) and the natural partitioner: the generator's rule and
options, one client per device, and a federation of 10,000 devices that stays cheap."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from fedsim.build import load_experiment
from fedsim.cli import main
from fedsim.data import DATASETS, load_dataset
from fedsim.data.synthetic import load_synthetic
from fedsim.errors import UserError
from fedsim.splitting import describe_partition, split_dataset
from partitioners import NaturalPartitioner, Partition
from partitioners.skew import distributions, group_hellinger, hellinger

from .conftest import QUICKSTART, TINY


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))


def natural_experiment(*overrides: str):
    """The tiny experiment split naturally. (``tiny_experiment("partition.name=natural")``
    cannot be: TINY sets ``partition.alpha``, which the natural scheme does not take.)"""
    base = [o for o in TINY if not o.startswith(("partition.alpha=", "model.hidden="))]
    return load_experiment(QUICKSTART, [*base, "partition.name=natural", *overrides])


def device_sizes(dataset) -> np.ndarray:
    """Training samples per device."""
    return np.bincount(dataset.group_train)


def mean_label_skew(dataset) -> dict[str, float]:
    """Mean skew of the devices' label distributions against the federation's."""
    partition = NaturalPartitioner().split(dataset.y_train, groups=dataset.group_train)
    return partition.skew().summary


def test_default_dataset_is_fedprox_sized_and_typed():
    dataset = load_synthetic()
    assert dataset.name == "synthetic" and dataset.classes == tuple("0123456789")
    assert dataset.x_train.dtype == dataset.x_test.dtype == np.float32
    assert dataset.y_train.dtype == dataset.y_test.dtype == np.int64
    assert dataset.x_train.shape == (len(dataset.y_train), 60) and dataset.x_test.shape == (len(dataset.y_test), 60)
    assert dataset.input_shape == (60,)
    assert dataset.group_train.dtype == np.int64 and dataset.group_train.shape == dataset.y_train.shape
    assert sorted(set(dataset.group_train.tolist())) == list(range(30))
    assert dataset.domain_train is None and dataset.domains == ()
    total = len(dataset.y_train) + len(dataset.y_test)
    assert total / 30 > 50 and device_sizes(dataset).min() >= 40  # 50 + lognormal, 80% of it kept
    assert set(np.unique(dataset.y_train)) <= set(range(10))
    assert np.isfinite(dataset.x_train).all()


def test_registered_offline_and_listed(capsys):
    info = DATASETS["synthetic"]
    assert info.offline and info.shape == (60,) and len(info.classes) == 10
    assert main(["list"]) == 0
    assert "synthetic" in capsys.readouterr().out
    assert main(["data", "info", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "shape 60, 10 classes" in out and "num_devices = 30" in out and "embedded" in out
    assert main(["data", "download", "synthetic"]) == 2


def test_same_options_give_the_same_data_and_seeds_differ():
    a, b = load_synthetic(num_devices=8, seed=3), load_synthetic(num_devices=8, seed=3)
    for name in ("x_train", "y_train", "x_test", "y_test", "group_train"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    other = load_synthetic(num_devices=8, seed=4)
    assert len(other.y_train) != len(a.y_train) or not np.array_equal(other.x_train, a.x_train)
    equal = {"num_devices": 8, "size_distribution": "equal", "samples_per_device": 100}
    x, y = load_synthetic(**equal, seed=0), load_synthetic(**equal, seed=1)
    assert x.x_train.shape == y.x_train.shape and not np.allclose(x.x_train, y.x_train)
    assert (x.y_train != y.y_train).mean() > 0.3


def test_device_k_does_not_depend_on_the_number_of_devices():
    few, many = load_synthetic(num_devices=5), load_synthetic(num_devices=40)
    kept = many.group_train < 5
    assert np.array_equal(few.x_train, many.x_train[kept]) and np.array_equal(few.y_train, many.y_train[kept])


def test_each_device_holds_out_its_test_fraction():
    dataset = load_synthetic(num_devices=6, size_distribution="equal", samples_per_device=20, test_fraction=0.25)
    assert device_sizes(dataset).tolist() == [15] * 6
    assert len(dataset.y_test) == 6 * 5
    tiny = load_synthetic(num_devices=4, size_distribution="equal", samples_per_device=3, test_fraction=0.9, seed=1)
    assert device_sizes(tiny).tolist() == [2] * 4 and len(tiny.y_test) == 4, "a device keeps two training samples"


def test_lognormal_sizes_vary_and_equal_sizes_are_equal():
    # 50 + floor(lognormal(mu, 2)) with mean 453 - 50: the median device is 50 + 403 / e^2
    sizes = load_synthetic(num_devices=1000, test_fraction=0.5).group_train
    totals = np.bincount(sizes) * 2  # half held out (rounded), so about the device's size
    assert totals.min() >= 50 and totals.max() > 10 * np.median(totals)
    assert np.median(totals) == pytest.approx(50 + 403 / np.e**2, rel=0.12)
    small = load_synthetic(num_devices=300, samples_per_device=20, min_samples=5, test_fraction=0.1)
    assert small.group_train.size > 0 and np.bincount(small.group_train).min() >= 4
    equal = load_synthetic(num_devices=300, samples_per_device=20, size_distribution="equal")
    assert np.bincount(equal.group_train).tolist() == [16] * 300
    assert len(equal.y_test) == 300 * 4


def test_beta_raises_label_skew_and_spreads_the_devices_inputs():
    for seed in (0, 1):
        options = {"num_devices": 40, "size_distribution": "equal", "samples_per_device": 200, "seed": seed}
        calm, spread = load_synthetic(beta=0.0, **options), load_synthetic(beta=3.0, **options)
        calm_skew, spread_skew = mean_label_skew(calm), mean_label_skew(spread)
        assert spread_skew["mean_hellinger"] > calm_skew["mean_hellinger"] + 0.01
        assert spread_skew["mean_jensen_shannon"] > calm_skew["mean_jensen_shannon"] + 0.02
        assert spread_skew["mean_effective_classes"] < calm_skew["mean_effective_classes"] - 0.1

        def centre_spread(dataset):  # spread across devices of each device's mean input
            means = np.stack([dataset.x_train[dataset.group_train == k].mean(axis=0) for k in range(40)])
            return means.mean(axis=1).std()

        assert centre_spread(spread) > 2 * centre_spread(calm)


def test_alpha_shifts_every_logit_alike_and_so_leaves_the_labels():
    """u_k adds u_k (1 + sum x) to each class's logit: softmax's argmax does not move."""
    options = {"num_devices": 20, "size_distribution": "equal", "samples_per_device": 100}
    base, shifted = load_synthetic(alpha=0.0, **options), load_synthetic(alpha=1.0, **options)
    assert np.array_equal(base.x_train, shifted.x_train)
    assert (base.y_train != shifted.y_train).mean() < 1e-3  # float32 near-ties at most
    assert mean_label_skew(base)["mean_hellinger"] > 0.5, "devices differ even at alpha = beta = 0"


def test_iid_variant_gives_near_identical_label_distributions():
    options = {"num_devices": 20, "size_distribution": "equal", "samples_per_device": 400}
    iid = mean_label_skew(load_synthetic(iid=True, **options))
    assert iid["mean_hellinger"] < 0.12 and iid["mean_effective_classes"] > 3
    assert mean_label_skew(load_synthetic(**options))["mean_hellinger"] > 0.5


@pytest.mark.parametrize(
    "options, key",
    [
        ({"alpha": -0.5}, "alpha"),
        ({"beta": float("inf")}, "beta"),
        ({"beta": "1"}, "beta"),
        ({"num_devices": 0}, "num_devices"),
        ({"num_devices": 2.5}, "num_devices"),
        ({"iid": "yes"}, "iid"),
        ({"samples_per_device": 1}, "samples_per_device"),
        ({"size_distribution": "uniform"}, "size_distribution"),
        ({"min_samples": 1}, "min_samples"),
        ({"samples_per_device": 20}, "min_samples"),  # below the default min_samples = 50
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"seed": -1}, "seed"),
        ({"size_distribution": "equal", "samples_per_device": 2}, "test_fraction"),  # nothing held out
    ],
)
def test_bad_options_raise_a_value_error_naming_the_key(options, key):
    with pytest.raises(ValueError, match=key):
        load_synthetic(**options)


def test_bad_options_in_an_experiment_are_one_line_errors():
    with pytest.raises(UserError, match=r"\[dataset\] min_samples"):
        load_dataset("synthetic", samples_per_device=20)


def test_natural_partition_gives_client_g_exactly_group_g():
    dataset = load_synthetic(num_devices=12, samples_per_device=60, min_samples=10)
    partition = NaturalPartitioner().split(dataset.y_train, groups=dataset.group_train)
    assert partition.num_clients == 12
    dealt = partition.assigned()
    assert np.array_equal(np.sort(dealt), np.arange(len(dataset.y_train))), "disjoint and complete"
    for group in range(12):
        assert np.array_equal(partition[group], np.flatnonzero(dataset.group_train == group))
    assert NaturalPartitioner(12).split(dataset.y_train, groups=dataset.group_train) == partition
    assert partition.groups == {}

    # ids need not be 0..G-1: clients follow the sorted ids present
    y, groups = np.array([0, 1, 2, 0, 1, 2]), np.array([7, 3, 3, 9, 7, 7])
    sparse = NaturalPartitioner().split(y, groups=groups, seed=5)
    assert [ix.tolist() for ix in sparse.client_indices] == [[1, 2], [0, 4, 5], [3]]


def test_natural_partition_refuses_a_wrong_count_and_missing_groups():
    y, groups = np.zeros(10, dtype=np.int64), np.repeat([0, 1], 5)
    with pytest.raises(ValueError, match="the dataset has 2; set num_clients=2"):
        NaturalPartitioner(3).split(y, groups=groups)
    with pytest.raises(ValueError, match="groups"):
        NaturalPartitioner().split(y)
    with pytest.raises(ValueError, match="num_clients"):
        NaturalPartitioner(0)


def test_natural_split_of_a_dataset_without_groups_is_a_one_line_user_error():
    experiment = natural_experiment()
    with pytest.raises(UserError, match="'natural' gives each client one natural group, but dataset 'digits' has none"):
        split_dataset(experiment, load_dataset("digits"))
    counted = natural_experiment("dataset.name=synthetic", "dataset.num_devices=5")  # TINY's num_clients = 4
    with pytest.raises(UserError, match=r"\[partition\] num_clients=4 .* the dataset has 5"):
        split_dataset(counted, load_dataset("synthetic", num_devices=5))


def test_a_tiny_federation_of_synthetic_devices_runs(tmp_path):
    from fedsim.runner import run_experiment

    experiment = natural_experiment(
        "dataset.name=synthetic", "dataset.num_devices=5", "partition.num_clients=5", "model.name=mlp"
    )
    result = run_experiment(experiment, tmp_path / "run")
    assert result.summary["num_clients"] == 5 and result.summary["rounds_completed"] == 2
    assert 0.0 <= result.summary["accuracy"] <= 1.0
    dataset = load_dataset("synthetic", num_devices=5)
    partition = Partition.load(result.path / "partition.npz")
    assert np.array_equal(partition[3], np.flatnonzero(dataset.group_train == 3))


def test_ten_thousand_devices_make_ten_thousand_clients_cheaply(tmp_path):
    started = time.perf_counter()
    dataset = load_synthetic(num_devices=10_000, samples_per_device=20, min_samples=5)
    generated = time.perf_counter() - started
    assert generated < 10, f"generating 10,000 devices took {generated:.1f} s"
    experiment = natural_experiment(
        "dataset.name=synthetic",
        "dataset.num_devices=10000",
        "dataset.samples_per_device=20",
        "dataset.min_samples=5",
        "partition.num_clients=10000",
    )
    partition = split_dataset(experiment, dataset)
    assert partition.num_clients == 10_000 and partition.sizes.min() >= 2
    assert partition.sizes.sum() == len(dataset.y_train)

    started = time.perf_counter()
    report = describe_partition(experiment, dataset, partition, tmp_path)
    assert time.perf_counter() - started < 20
    assert len(json.loads((tmp_path / "skew.json").read_text())["clients"]["hellinger"]) == 10_000
    assert report.summary["num_clients"] == 10_000


def test_heatmap_draws_the_first_clients_and_says_so(monkeypatch, tmp_path):
    import fedsim.plots

    drawn = {}

    def keep(figure, path):
        axis = figure.axes[0]
        drawn["title"], drawn["shape"] = axis.get_title(), axis.images[0].get_array().shape
        fedsim.plots.plt.close(figure)

    monkeypatch.setattr(fedsim.plots, "save_figure", keep)
    fedsim.plots.plot_heatmap(np.ones((10_000, 10), dtype=np.int64), tmp_path / "h.png", "natural", "class")
    assert drawn["shape"] == (fedsim.plots.HEATMAP_MAX_CLIENTS, 10)
    assert f"the first {fedsim.plots.HEATMAP_MAX_CLIENTS} of 10,000 clients" in drawn["title"]
    fedsim.plots.plot_heatmap(np.ones((12, 10), dtype=np.int64), tmp_path / "h.png", "small", "class")
    assert drawn["shape"] == (12, 10) and drawn["title"] == "small"


def test_group_hellinger_needs_no_clients_by_groups_matrix():
    rng = np.random.default_rng(0)
    y, groups = rng.integers(0, 5, 3000), rng.integers(0, 7, 3000)
    owner = rng.integers(0, 30, 3000)
    partition = Partition([np.flatnonzero(owner == c) for c in range(30)] + [np.zeros(0, np.int64)], y)
    counts = partition.group_matrix(groups, 7)
    dense = hellinger(distributions(counts), counts.sum(axis=0) / counts.sum())
    assert np.allclose(group_hellinger(partition, groups), dense, equal_nan=True)
    assert np.isnan(group_hellinger(partition, groups)[-1])

    # 10,000 clients of one group each: a dense matrix would hold 10^8 cells
    devices = np.repeat(np.arange(10_000), 3)
    one_each = Partition(np.split(np.arange(30_000), 10_000), devices % 10, groups={"device": devices})
    started = time.perf_counter()
    distances = one_each.skew().clients["hellinger_device"]
    assert time.perf_counter() - started < 5
    assert np.allclose(distances, np.sqrt(1 - np.sqrt(1 / 10_000)))
