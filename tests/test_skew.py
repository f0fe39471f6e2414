"""Skew measures against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from partitioners import Partition
from partitioners.skew import gini


def one_class_per_client(classes: int = 4, per_class: int = 25) -> Partition:
    y = np.repeat(np.arange(classes), per_class)
    return Partition([np.flatnonzero(y == c) for c in range(classes)], y)


def test_label_measures_of_one_class_per_client():
    report = one_class_per_client().skew()
    table = report.clients
    # p = one-hot, q = uniform over 4 classes
    assert table["hellinger"].tolist() == pytest.approx([math.sqrt(1 - math.sqrt(0.25))] * 4)
    expected_js = 0.5 * math.log2(1 / 0.625) + 0.5 * (0.25 * math.log2(0.25 / 0.625) + 3 * 0.25 * math.log2(2))
    assert table["jensen_shannon"].tolist() == pytest.approx([expected_js] * 4)
    # Zhao et al.'s sum |p - q| = 0.75 + 3 * 0.25, the same for every class: labels have no order
    assert table["emd"].tolist() == pytest.approx([1.5] * 4)
    assert table["effective_classes"].tolist() == pytest.approx([1.0] * 4)
    assert table["classes"].tolist() == [1] * 4
    assert report.summary["gini_sizes"] == 0.0
    assert report.summary["coverage"] == 1.0


def test_iid_clients_are_close_to_the_federation():
    y = np.tile(np.arange(5), 40)
    report = Partition(np.array_split(np.arange(200), 4), y).skew()
    assert report.summary["mean_hellinger"] == pytest.approx(0.0, abs=1e-7)
    assert report.summary["mean_jensen_shannon"] == pytest.approx(0.0, abs=1e-7)
    assert report.summary["mean_effective_classes"] == pytest.approx(5.0)


def test_gini_of_sizes():
    assert gini(np.array([5, 5, 5, 5])) == 0.0
    assert gini(np.array([0, 0, 0, 8])) == pytest.approx(0.75)
    assert gini(np.array([1, 3])) == pytest.approx(0.25)


def test_group_hellinger_and_frechet_distance():
    rng = np.random.default_rng(0)
    y = np.zeros(400, dtype=np.int64)
    domains = np.repeat([0, 1], 200)
    embeddings = rng.normal(size=(400, 2))
    embeddings[200:, 0] += 6.0  # domain 1 sits 6 units to the right
    partition = Partition([np.arange(200), np.arange(200, 400)], y, groups={"domain": domains})
    table = partition.skew(embeddings).clients
    assert table["hellinger_domain"].tolist() == pytest.approx([math.sqrt(1 - math.sqrt(0.5))] * 2)
    # each half's mean is 3 units from the global mean; the global x-variance is 1 + 9
    mixed = Partition([np.arange(0, 400, 2), np.arange(1, 400, 2)], y).skew(embeddings).clients
    assert (table["frechet"] > 8.0).all()
    assert (mixed["frechet"] < 0.5).all()


def test_mmd_is_near_zero_for_iid_clients_of_any_size_where_frechet_is_not():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(6000, 16))
    y = np.zeros(6000, dtype=np.int64)
    small, large = np.arange(12), np.arange(12, 1012)
    table = Partition([small, large, np.arange(1012, 6000)], y).skew(embeddings).clients
    assert abs(table["mmd"][0]) < 0.05 and abs(table["mmd"][1]) < 0.005
    assert table["frechet"][0] > 5 * table["frechet"][1]  # the Gaussian fit of 12 rows is poor
    embeddings[:1012, :4] += 2.0  # the first two clients move away from the rest
    shifted = Partition([small, large, np.arange(1012, 6000)], y).skew(embeddings).clients
    assert (shifted["mmd"][:2] > 0.1).all()
    assert shifted["mmd"][0] == pytest.approx(shifted["mmd"][1], abs=0.1)


def test_report_is_json_ready_with_empty_clients_as_null():
    y = np.array([0, 1, 1, 0])
    report = Partition([np.array([0, 1]), np.array([], dtype=np.int64), np.array([2, 3])], y).skew()
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["clients"]["hellinger"][1] is None
    assert data["clients"]["size"] == [2, 0, 2]
    assert data["summary"]["num_clients"] == 3


def test_entropy_and_jensen_shannon_agree_with_scipy():
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import entropy as scipy_entropy

    from partitioners.skew import entropy, jensen_shannon

    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = rng.integers(0, 20, (7, 10)).astype(float)
        counts[counts < 5] = 0  # clients without some classes: 0 log 0
        counts[:, 0] += 1
        p = counts / counts.sum(axis=1, keepdims=True)
        q = rng.random(10)
        q /= q.sum()
        np.testing.assert_allclose(entropy(p), scipy_entropy(p, axis=1), atol=1e-12)
        expected = jensenshannon(p, q[None, :], axis=1, base=2) ** 2
        np.testing.assert_allclose(jensen_shannon(p, q[None, :]), expected, atol=1e-12)
