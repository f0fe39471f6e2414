"""Corruption transforms: parsing, determinism, what each one does, and corruption domains
on any dataset through ``[dataset] domains``."""

from __future__ import annotations

import numpy as np
import pytest

import fedsim.data
from fedsim.data import load_dataset, parse_transform, with_transform_domains
from fedsim.data.dataset import Dataset
from fedsim.errors import UserError
from fedsim.registry import validate_parameters

from .conftest import QUICKSTART


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    monkeypatch.setattr(fedsim.data, "_LOADED", {})


def images(n: int = 6, channels: int = 1, side: int = 9, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, channels, side, side), dtype=np.float32)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("rotat-30", ["unknown transform 'rotat'", "did you mean 'rotate'"]),
        ("rotate", ["needs a number", "rotate-30"]),
        ("invert-2", ["takes no number"]),
        ("noise-abc", ["'abc' is not a number"]),
        ("blur-0", ["must be positive"]),
        ("rotate-10+sharpen", ["unknown transform 'sharpen'"]),
    ],
)
def test_bad_specs_are_explained(spec, words):
    with pytest.raises(ValueError) as error:
        parse_transform(spec)
    for word in words:
        assert word in str(error.value)


def test_transforms_are_deterministic_per_seed_and_keep_range_and_dtype():
    x = images()
    transform = parse_transform("rotate-20+noise-0.3+colour")
    first, again, other = transform(x, seed=1), transform(x, seed=1), transform(x, seed=2)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert first.dtype == np.float32 and first.min() >= 0 and first.max() <= 1
    np.testing.assert_array_equal(x, images())  # the input is not modified


def test_rotate_90_turns_counter_clockwise():
    x = np.zeros((1, 1, 5, 5), np.float32)
    x[0, 0, 0, 4] = 1  # top right
    rotated = parse_transform("rotate-90")(x)
    assert rotated[0, 0, 0, 0] == pytest.approx(1)  # now top left
    np.testing.assert_allclose(rotated[0, 0], np.rot90(x[0, 0]), atol=1e-6)


def test_each_transform_does_what_it_says():
    x = images(n=20, channels=3, side=16)
    np.testing.assert_allclose(parse_transform("invert")(x), 1 - x, atol=1e-6)
    np.testing.assert_array_equal(parse_transform("identity")(x), x)
    assert parse_transform("blur-1.5")(x).std() < 0.5 * x.std()
    contrast = parse_transform("contrast-0.25")(x)
    np.testing.assert_allclose(contrast.std(axis=(1, 2, 3)), 0.25 * x.std(axis=(1, 2, 3)), rtol=1e-4)
    noise = parse_transform("noise-0.1")(np.full_like(x, 0.5)) - 0.5
    assert noise.std() == pytest.approx(0.1, rel=0.05)


def test_colour_paints_grey_images_in_three_channels_with_visible_contrast():
    x = np.zeros((50, 1, 8, 8), np.float32)
    x[:, :, 2:6, 2:6] = 1.0  # ink in the middle
    transform = parse_transform("colour")
    assert transform.output_channels(1) == 3
    painted = transform(x, seed=0)
    assert painted.shape == (50, 3, 8, 8)
    luma = np.tensordot(painted, [0.299, 0.587, 0.114], axes=([1], [0]))
    assert (np.abs(luma[:, 3, 3] - luma[:, 0, 0]) >= 0.3 - 1e-5).all()
    assert len({tuple(np.round(p[:, 0, 0], 3)) for p in painted}) > 40  # paper colours vary per image


def toy_dataset(n_train: int = 60, n_test: int = 30) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(
        "toy",
        rng.random((n_train, 1, 6, 6), dtype=np.float32),
        np.arange(n_train) % 3,
        rng.random((n_test, 1, 6, 6), dtype=np.float32),
        np.arange(n_test) % 3,
        ("a", "b", "c"),
    )


def test_transform_domains_are_disjoint_stratified_shares():
    base = toy_dataset()
    shifted = with_transform_domains(base, ["identity", "invert", "rotate-180"])
    assert shifted.domains == ("identity", "invert", "rotate-180")
    for x, y, domain, original in (
        (shifted.x_train, shifted.y_train, shifted.domain_train, base.x_train),
        (shifted.x_test, shifted.y_test, shifted.domain_test, base.x_test),
    ):
        assert len(x) == len(original)  # shares, not copies: every sample once
        counts = np.zeros((3, 3), int)
        np.add.at(counts, (domain, y), 1)
        assert counts.max() - counts.min() <= 1  # every domain gets an equal share of every class
        np.testing.assert_array_equal(x[domain == 0], original[domain == 0])
        np.testing.assert_allclose(x[domain == 1], 1 - original[domain == 1], atol=1e-6)
        np.testing.assert_allclose(x[domain == 2], original[domain == 2][:, :, ::-1, ::-1], atol=1e-5)
    np.testing.assert_array_equal(shifted.y_train, base.y_train)


def test_colour_domain_makes_every_domain_three_channels():
    shifted = with_transform_domains(toy_dataset(), ["identity", "colour"])
    assert shifted.x_train.shape[1] == 3
    grey = shifted.x_train[shifted.domain_train == 0]
    np.testing.assert_array_equal(grey[:, 0], grey[:, 2])


def test_transform_domains_refuse_duplicates_and_multi_domain_data():
    with pytest.raises(ValueError, match="twice"):
        with_transform_domains(toy_dataset(), ["invert", "invert"])
    multi = with_transform_domains(toy_dataset(), ["identity", "invert"])
    with pytest.raises(ValueError, match="already has domains"):
        with_transform_domains(multi, ["blur"])


def test_embedded_dataset_becomes_multi_domain_through_load_dataset():
    dataset = load_dataset("digits", domains=["identity", "rotate-90", "invert+noise-0.1"])
    assert dataset.domains == ("identity", "rotate-90", "invert+noise-0.1")
    assert sorted(np.unique(dataset.domain_train)) == [0, 1, 2]
    assert dataset.x_train.shape[1:] == (1, 8, 8)
    plain = load_dataset("digits")
    np.testing.assert_array_equal(dataset.y_train, plain.y_train)


def test_bad_spec_fails_config_validation_before_any_data_loads():
    from fedsim.data.embedded import load_mnist5k

    with pytest.raises(UserError) as error:
        validate_parameters(load_mnist5k, {"domains": ["rotate-30", "blurr-2"]}, "[dataset]")
    message = str(error.value)
    assert message.startswith("[dataset] domains") and "did you mean 'blur'" in message and "\n" not in message


def test_experiment_with_transform_domains_resolves_and_keeps_them():
    from fedsim.build import load_experiment

    experiment = load_experiment(QUICKSTART, ["dataset.name=mnist5k", 'dataset.domains=["identity", "rotate-45"]'])
    assert list(experiment.dataset.params["domains"]) == ["identity", "rotate-45"]
    with pytest.raises(UserError, match=r"quickstart.toml: \[dataset\] domains"):
        load_experiment(QUICKSTART, ['dataset.domains=["spin-45"]'])
