"""``digits-domains``: five genuinely different digit domains, generated offline, seeded and cached."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier

import fedsim.data
from fedsim.data import DATASETS, load_dataset
from fedsim.data import digits_domains as dd
from fedsim.data.embedded import mnist5k_arrays
from fedsim.errors import UserError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One generation for the whole module, in a cache folder of its own."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDSIM_CACHE", str(folder))
        patch.setattr(fedsim.data, "_LOADED", {})
        yield folder


@pytest.fixture(scope="module")
def dataset(cache):
    return load_dataset("digits-domains")


def test_shape_range_labels_and_domain_ids(dataset, cache):
    assert dataset.domains == ("mnist", "digits", "mnist-m", "synth", "texture") == DATASETS["digits-domains"].domains
    assert dataset.input_shape == (3, 28, 28) == DATASETS["digits-domains"].shape
    for x, y, domain in (
        (dataset.x_train, dataset.y_train, dataset.domain_train),
        (dataset.x_test, dataset.y_test, dataset.domain_test),
    ):
        assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
        assert y.dtype == np.int64 and domain.dtype == np.int64 and len(domain) == len(y)
        pairs = np.zeros((5, 10), int)
        np.add.at(pairs, (domain, y), 1)
        assert (pairs > 0).all()  # every digit in every domain, in train and in test
    total = len(dataset.y_train) + len(dataset.y_test)
    assert total == 2500 + 1797 + 2500 + 2500 + 2500
    assert len(dataset.y_test) == pytest.approx(0.2 * total, abs=5)
    assert len(list(cache.glob("digits-domains-v*.npz"))) == 1


def test_a_classifier_tells_the_domains_apart_far_above_chance(dataset):
    def features(x):
        n = len(x)
        pooled = x.reshape(n, 3, 7, 4, 7, 4).mean(axis=(3, 5)).reshape(n, -1)
        colour = np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1)
        saturation = x.max(axis=1) - x.min(axis=1)
        edges = np.abs(np.diff(x, axis=3)).mean(axis=(1, 2, 3))
        return np.column_stack([pooled, colour, saturation.mean(axis=(1, 2)), saturation.std(axis=(1, 2)), edges])

    rng = np.random.default_rng(0)
    train = rng.choice(len(dataset.y_train), 2000, replace=False)
    test = rng.choice(len(dataset.y_test), 1000, replace=False)
    forest = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    forest.fit(features(dataset.x_train[train]), dataset.domain_train[train])
    accuracy = (forest.predict(features(dataset.x_test[test])) == dataset.domain_test[test]).mean()
    chance = 1 / len(dataset.domains)
    assert accuracy > 0.85, f"domain accuracy {accuracy:.3f} vs chance {chance:.2f}"
    per_domain = [
        (forest.predict(features(dataset.x_test[test][dataset.domain_test[test] == d])) == d).mean() for d in range(5)
    ]
    assert min(per_domain) > 0.6, f"a domain is hard to tell from the others: {per_domain}"


def test_domains_look_like_their_recipes(dataset):
    x, domain = dataset.x_train, dataset.domain_train
    saturation = (x.max(axis=1) - x.min(axis=1)).mean(axis=(1, 2))
    by_name = {name: saturation[domain == d] for d, name in enumerate(dataset.domains)}
    assert by_name["mnist"].max() == 0 and by_name["digits"].max() == 0  # grey
    assert min(by_name[name].mean() for name in ("mnist-m", "synth", "texture")) > 0.1  # colour
    grey = {name: x[domain == d, 0] for d, name in enumerate(dataset.domains) if name in ("mnist", "digits")}
    # MNIST has sharp strokes; the upsampled 8x8 digits have almost no pure-white pixels
    assert (grey["mnist"] > 0.99).mean() > 5 * (grey["digits"] > 0.99).mean()


def test_mnist_and_mnist_m_use_disjoint_halves_of_mnist(cache):
    _, y = mnist5k_arrays()
    first, second = dd._halves(y, np.random.default_rng(0))
    assert len(np.intersect1d(first, second)) == 0 and len(first) + len(second) == len(y)
    np.testing.assert_array_equal(np.bincount(y[first]), np.bincount(y[second]))


def test_mnist_domain_holds_exactly_one_half_of_the_mnist_subset(cache):
    arrays = dd.generated_arrays()
    x, _ = mnist5k_arrays()
    mnist_domain = arrays["x"][arrays["domain"] == dd.DOMAINS.index("mnist")][:, 0]
    known = {image.tobytes() for image in x}
    assert len(mnist_domain) == len(x) // 2 and all(image.tobytes() in known for image in mnist_domain)


def test_generation_is_seeded(cache):
    for make in (dd._synth, dd._texture):
        first, labels = make(30, np.random.default_rng(5))
        again, _ = make(30, np.random.default_rng(5))
        other, _ = make(30, np.random.default_rng(6))
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, other)
        assert first.shape == (30, 3, 28, 28) and first.dtype == np.uint8 and set(labels) == set(range(10))
    digits = mnist5k_arrays()[0][:10]
    np.testing.assert_array_equal(
        dd._mnist_m(digits, np.random.default_rng(1)), dd._mnist_m(digits, np.random.default_rng(1))
    )


def test_selected_domains_are_renumbered_and_keep_their_samples(dataset):
    subset = load_dataset("digits-domains", domains=["texture", "mnist"])
    assert subset.domains == ("texture", "mnist")
    texture = dataset.domains.index("texture")
    np.testing.assert_array_equal(
        subset.x_test[subset.domain_test == 0], dataset.x_test[dataset.domain_test == texture]
    )
    assert sorted(np.unique(subset.domain_train)) == [0, 1]


def test_unknown_or_repeated_domain_is_a_user_error(cache):
    with pytest.raises(UserError, match=r"\[dataset\] domains"):
        load_dataset("digits-domains", domains=["mnist", "svhn"])
    with pytest.raises(UserError, match="distinct"):
        load_dataset("digits-domains", domains=["mnist", "mnist"])
