"""Synthetic(alpha, beta): the federated benchmark of FedProx (Li et al., "Federated
Optimization in Heterogeneous Networks", MLSys 2020), generated offline to any size.

The rule, for device k (d = 60 features, C = 10 classes)::

    u_k ~ N(0, alpha),  B_k ~ N(0, beta)
    W_k (C x d), b_k (C): entries ~ N(u_k, 1)    the device's own model
    v_k (d):              entries ~ N(B_k, 1)    the device's own input mean
    x ~ N(v_k, Sigma),  Sigma diagonal, Sigma_jj = j^-1.2 (j = 1..d)
    y = argmax softmax(W_k x + b_k)

alpha and beta are standard deviations, as ``np.random.normal(0, alpha)`` in the authors'
generator (the paper writes N(0, alpha); the two agree at the usual 0, 0.5 and 1).
Synthetic-IID (``iid=True``) is the authors' ``generate_iid.py``: one W, b ~ N(0, 1)
shared by every device and x ~ N(0, Sigma) everywhere (v = 0); alpha and beta play no part.
Device sizes follow the authors' 50 + floor(lognormal(4, 2)), which the defaults reproduce;
``size_distribution = "equal"`` gives every device the same size instead.

Mind what alpha can do: u_k moves every entry of W_k and b_k alike, which adds
u_k (1 + sum_j x_j) to every class's logit, and softmax ignores a shift common to all
classes. So alpha never changes a label (the rule is the authors', kept as published).
The devices' label skew comes from their own W_k, b_k, strong even at alpha = beta = 0,
and grows with beta, which also spreads the devices' inputs apart.

LEAF's own ``data/synthetic`` generator is a different, cluster-based one; this module
follows FedProx's, the one the literature calls Synthetic(alpha, beta).
"""

from __future__ import annotations

import math
import zlib
from typing import Literal

import numpy as np

from fedsim.data.dataset import Dataset

DIMENSION = 60
NUM_CLASSES = 10
CLASSES = tuple(str(c) for c in range(NUM_CLASSES))
SIZE_SIGMA = 2.0  # sigma of the authors' lognormal(4, 2) device sizes
MIN_TRAIN = 2  # every device keeps two training samples: a client needs two


def load_synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    num_devices: int = 30,
    iid: bool = False,
    samples_per_device: int = 453,
    size_distribution: Literal["lognormal", "equal"] = "lognormal",
    min_samples: int = 50,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """FedProx's Synthetic(alpha, beta): ``num_devices`` devices, each with its own model
    (W_k, b_k) and input mean v_k; ``group_train`` holds each training sample's device.

    Parameters
    ----------
    alpha, beta : float
        Spread of the devices' models and of their inputs (>= 0); ignored when ``iid``.
        alpha leaves the labels unchanged (see the module docstring).
    num_devices : int
        Number of devices (natural groups); the authors use 30.
    iid : bool
        Synthetic-IID: one model and one input distribution for every device.
    samples_per_device : int
        The expected device size. With ``"lognormal"``, a device holds ``min_samples +
        floor(L)``, L ~ lognormal(mu, 2) with mean ``samples_per_device - min_samples``:
        heavy-tailed, so most devices are small and a few large (453 and 50 give the
        authors' 50 + floor(lognormal(4, 2))). With ``"equal"`` every device holds exactly
        ``samples_per_device``.
    min_samples : int
        The smallest device under ``"lognormal"`` (>= 2; ``"equal"`` ignores it).
    test_fraction : float
        Share of each device's samples held out into the global test split.
    seed : int
        The data seed: the same options always give the same data, whatever the
        experiment's seed. Each quantity has its own stream, so device k's data does not
        depend on ``num_devices``: the first 30 of 10,000 devices are the 30-device dataset.
    """
    _check_options(
        alpha, beta, num_devices, iid, samples_per_device, size_distribution, min_samples, test_fraction, seed
    )
    sizes = _device_sizes(num_devices, samples_per_device, size_distribution, min_samples, seed)
    x, y = _generate(sizes, float(alpha), float(beta), bool(iid), seed)

    # Samples of a device are exchangeable, so its last n_test samples are a random hold-out.
    n_test = np.minimum(np.rint(test_fraction * sizes).astype(np.int64), sizes - MIN_TRAIN)
    if n_test.sum() == 0:
        raise ValueError(
            f"test_fraction={test_fraction} holds out no sample of devices this small; "
            "raise test_fraction or samples_per_device"
        )
    starts = np.cumsum(sizes) - sizes
    position = np.arange(len(y)) - np.repeat(starts, sizes)
    test = position >= np.repeat(sizes - n_test, sizes)
    group_train = np.repeat(np.arange(num_devices, dtype=np.int64), sizes - n_test)
    return Dataset("synthetic", x[~test], y[~test], x[test], y[test], CLASSES, group_train=group_train)


def _generate(sizes: np.ndarray, alpha: float, beta: float, iid: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x (float32) and y (int64) of every device, device after device."""
    num_devices, total = len(sizes), int(sizes.sum())
    # x ~ N(v_k, Sigma): scaled noise now, each device's mean added below
    x = _stream(seed, "x").standard_normal((total, DIMENSION), dtype=np.float32)
    x *= np.sqrt(np.arange(1, DIMENSION + 1, dtype=np.float32) ** -1.2)
    if iid:
        weights = _stream(seed, "W").standard_normal((NUM_CLASSES, DIMENSION), dtype=np.float32)
        bias = _stream(seed, "b").standard_normal(NUM_CLASSES, dtype=np.float32)
        return x, np.argmax(x @ weights.T + bias, axis=1).astype(np.int64)

    u = _stream(seed, "u").normal(0.0, alpha, num_devices).astype(np.float32)
    b_mean = _stream(seed, "B").normal(0.0, beta, num_devices).astype(np.float32)
    v = b_mean[:, None] + _stream(seed, "v").standard_normal((num_devices, DIMENSION), dtype=np.float32)
    weights = u[:, None, None] + _stream(seed, "W").standard_normal(
        (num_devices, NUM_CLASSES, DIMENSION), dtype=np.float32
    )
    bias = u[:, None] + _stream(seed, "b").standard_normal((num_devices, NUM_CLASSES), dtype=np.float32)
    y = np.empty(total, dtype=np.int64)
    # One small matmul per device: about 6 us each (60 ms for 10,000 devices), faster than
    # gathering each sample's W_k, and no per-sample copy of the models.
    stop = np.cumsum(sizes)
    for k, (start, end) in enumerate(zip(stop - sizes, stop)):
        rows = x[start:end]
        rows += v[k]
        y[start:end] = np.argmax(rows @ weights[k].T + bias[k], axis=1)
    return x, y


def _device_sizes(num_devices: int, mean: int, distribution: str, min_samples: int, seed: int) -> np.ndarray:
    if distribution == "equal":
        return np.full(num_devices, mean, dtype=np.int64)
    mu = math.log(mean - min_samples) - SIZE_SIGMA**2 / 2  # E[lognormal(mu, sigma)] = mean - min_samples
    return min_samples + np.floor(_stream(seed, "sizes").lognormal(mu, SIZE_SIGMA, num_devices)).astype(np.int64)


def _stream(seed: int, quantity: str) -> np.random.Generator:
    """One generator per quantity: drawing more devices extends each stream and never
    shifts another, so device k's draws do not depend on ``num_devices``."""
    return np.random.default_rng([seed, zlib.crc32(quantity.encode())])


def _check_options(
    alpha, beta, num_devices, iid, samples_per_device, size_distribution, min_samples, test_fraction, seed
) -> None:
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not _is_number(value) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value, minimum in (
        ("num_devices", num_devices, 1),
        ("samples_per_device", samples_per_device, MIN_TRAIN),
        ("min_samples", min_samples, MIN_TRAIN),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not isinstance(iid, (bool, np.bool_)):
        raise ValueError(f"iid must be true or false, got {iid!r}")
    if size_distribution not in ("lognormal", "equal"):
        raise ValueError(f"size_distribution must be 'lognormal' or 'equal', got {size_distribution!r}")
    if size_distribution == "lognormal" and min_samples >= samples_per_device:
        raise ValueError(
            f"min_samples={min_samples} must be below samples_per_device={samples_per_device} "
            "(the mean device size); lower min_samples"
        )
    if not _is_number(test_fraction) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number with 0 < test_fraction < 1, got {test_fraction!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
