"""Embedders: the cache, the public split of the model embedder, files and references."""

from __future__ import annotations

import numpy as np
import pytest

from partitioners import EMBEDDERS, EmbeddingClusters, register_embedder
from partitioners.embedders import embed


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))


def small_images(n: int = 120):
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(3), n // 3)
    x = (rng.normal(size=(n, 1, 8, 8)) + y[:, None, None, None]).astype(np.float32)
    return x, y


def test_embeddings_are_cached_by_data_embedder_options_and_seed(monkeypatch):
    calls = []

    def counting(x, y, *, seed, scale: float = 1.0):
        calls.append(seed)
        return x.reshape(len(x), -1)[:, :4] * scale

    monkeypatch.setitem(EMBEDDERS, "counting", EMBEDDERS["pixels"])  # restored afterwards
    register_embedder("counting", counting)
    x, y = small_images()
    first = embed(x, y, embedder="counting", seed=1)
    again = embed(x, y, embedder="counting", seed=1)
    spelled_out = embed(x, y, embedder="counting", options={"scale": 1.0}, seed=1)  # the default, written out
    assert calls == [1] and np.array_equal(first, again) and np.array_equal(first, spelled_out)
    embed(x, y, embedder="counting", seed=2)
    embed(x, y, embedder="counting", options={"scale": 2.0}, seed=2)
    embed(x + 1, y, embedder="counting", seed=2)
    assert calls == [1, 2, 2, 2]


def test_pixels_embedder_gives_the_asked_dimensions():
    x, y = small_images()
    assert embed(x, y, embedder="pixels", options={"dims": 5}, seed=0).shape == (120, 5)


def test_model_embedder_hides_its_public_split():
    x, y = small_images()
    options = {"model": "mlp", "epochs": 1, "public_fraction": 0.25}
    embeddings = embed(x, y, embedder="model", options=options, seed=0)
    public = np.isnan(embeddings).any(axis=1)
    assert public.sum() == 30
    assert np.bincount(y[public]).tolist() == [10, 10, 10], "the public split is stratified"
    assert embeddings.shape == (120, 200)  # the MLP's last hidden layer
    partition = EmbeddingClusters(3, clusters=3, sizes="equal", min_size=5).split(y, embeddings=embeddings, seed=0)
    assert not np.isin(partition.assigned(), np.flatnonzero(public)).any()
    assert partition.sizes.sum() == 90


def test_file_embedder_and_module_reference(tmp_path):
    x, y = small_images()
    vectors = np.random.default_rng(1).normal(size=(120, 6)).astype(np.float32)
    np.save(tmp_path / "e.npy", vectors)
    assert np.array_equal(embed(x, y, embedder="file", options={"path": str(tmp_path / "e.npy")}), vectors)
    np.save(tmp_path / "short.npy", vectors[:100])
    with pytest.raises(ValueError, match="one row per sample"):
        embed(x, y, embedder="file", options={"path": str(tmp_path / "short.npy")})
    with pytest.raises(ValueError, match="no such file"):
        embed(x, y, embedder="file", options={"path": str(tmp_path / "missing.npy")})
    by_reference = embed(x, y, embedder="partitioners.embedders:pixel_embeddings", options={"dims": 3})
    assert by_reference.shape == (120, 3)
