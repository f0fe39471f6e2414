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

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedsim.checks import check_bool, check_integer
from fedsim.data.dataset import Dataset
from fedsim.data.population import Population

DIMENSION = 60
NUM_CLASSES = 10
CLASSES = tuple(str(c) for c in range(NUM_CLASSES))
SIZE_SIGMA = 2.0  # sigma of the authors' lognormal(4, 2) device sizes
MIN_TRAIN = 2  # every device keeps two training samples: a client needs two
SIGMA_SQRT = np.sqrt(np.arange(1, DIMENSION + 1, dtype=np.float32) ** -1.2)  # Sigma_jj = j^-1.2
DEVICE_STREAM = zlib.crc32(b"device")  # device k draws from the generator seeded (seed, this, k)
MAX_EAGER_DEVICES = 1_000_000  # more devices than this must be lazy


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
    lazy: bool = False,
    test_devices: int = 1000,
) -> Dataset | SyntheticPopulation:
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
        experiment's seed. Device k's data comes from its own generator, seeded by
        (seed, k), so it does not depend on ``num_devices``: the first 30 of 10,000
        devices are the 30-device dataset.
    lazy : bool
        Make each device's data only when its client runs (a :class:`SyntheticPopulation`),
        never all of it: millions of devices cost no memory. A client's data is the same
        either way; the global test split is the held-out samples of ``test_devices``
        devices spread evenly over the population (of every device when there are no more).
    test_devices : int
        With ``lazy``, how many devices' held-out samples make the global test split.
    """
    _check_options(
        alpha, beta, num_devices, iid, samples_per_device, size_distribution, min_samples, test_fraction, seed
    )
    check_bool("lazy", lazy)
    check_integer("test_devices", test_devices, minimum=1)
    rule = DeviceRule(
        float(alpha), float(beta), bool(iid), samples_per_device, size_distribution, min_samples, test_fraction, seed
    )
    if lazy:
        return SyntheticPopulation(rule, num_devices, test_devices)
    if num_devices > MAX_EAGER_DEVICES:
        raise ValueError(
            f"num_devices={num_devices:,} would hold every device's data in memory; set lazy = true, "
            f"which makes each device's data only when its client runs (or use at most {MAX_EAGER_DEVICES:,})"
        )
    parts = [rule.device(k) for k in range(num_devices)]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test = np.concatenate([p[2] for p in parts])
    y_test = np.concatenate([p[3] for p in parts])
    if len(y_test) == 0:
        raise ValueError(
            f"test_fraction={test_fraction} holds out no sample of devices this small; "
            "raise test_fraction or samples_per_device"
        )
    group_train = np.repeat(np.arange(num_devices, dtype=np.int64), [len(p[1]) for p in parts])
    return Dataset("synthetic", x_train, y_train, x_test, y_test, CLASSES, group_train=group_train)


@dataclass(frozen=True)
class DeviceRule:
    """The generator of one device's data from (seed, device id): its size, its model and
    input mean, its samples, and which of them the global test split holds out."""

    alpha: float
    beta: float
    iid: bool
    samples_per_device: int
    size_distribution: str
    min_samples: int
    test_fraction: float
    seed: int

    def _generator(self, device: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, DEVICE_STREAM, device])

    def _draw_size(self, rng: np.random.Generator) -> int:
        if self.size_distribution == "equal":
            return self.samples_per_device
        # E[lognormal(mu, sigma)] = samples_per_device - min_samples
        mu = math.log(self.samples_per_device - self.min_samples) - SIZE_SIGMA**2 / 2
        return self.min_samples + int(math.floor(rng.lognormal(mu, SIZE_SIGMA)))

    def size(self, device: int) -> int:
        """All of the device's samples, held out ones included (one draw, ~0.1 ms)."""
        return self._draw_size(self._generator(device))

    def held_out(self, size: int) -> int:
        """How many of a device's ``size`` samples go to the global test split: a share
        ``test_fraction``, leaving two to train on."""
        return int(min(round(self.test_fraction * size), size - MIN_TRAIN))

    def train_size(self, device: int) -> int:
        size = self.size(device)
        return size - self.held_out(size)

    def device(self, device: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x_train, y_train, x_test, y_test) of one device: x float32, y int64."""
        rng = self._generator(device)
        size = self._draw_size(rng)
        # x ~ N(v_k, Sigma): scaled noise, then the device's mean
        x = rng.standard_normal((size, DIMENSION), dtype=np.float32)
        x *= SIGMA_SQRT
        if self.iid:
            weights, bias = _shared_model(self.seed)
        else:
            u = np.float32(rng.normal(0.0, self.alpha))
            b_mean = np.float32(rng.normal(0.0, self.beta))
            x += b_mean + rng.standard_normal(DIMENSION, dtype=np.float32)
            weights = u + rng.standard_normal((NUM_CLASSES, DIMENSION), dtype=np.float32)
            bias = u + rng.standard_normal(NUM_CLASSES, dtype=np.float32)
        y = np.argmax(x @ weights.T + bias, axis=1).astype(np.int64)
        # Samples of a device are exchangeable, so its last ones are a random hold-out.
        keep = size - self.held_out(size)
        return x[:keep], y[:keep], x[keep:], y[keep:]


class SyntheticPopulation(Population):
    """Synthetic(alpha, beta) with each device's data made when its client asks for it.

    Nothing is kept per device: device k's data is regenerated from (seed, k), the same
    as the in-memory dataset's. The global test split is the held-out samples of
    ``test_devices`` devices spread evenly over the population.
    """

    name = "synthetic"
    classes = CLASSES
    input_shape = (DIMENSION,)

    def __init__(self, rule: DeviceRule, num_devices: int, test_devices: int) -> None:
        self.rule = rule
        self.num_clients = num_devices
        chosen = np.unique(np.linspace(0, num_devices - 1, min(test_devices, num_devices)).round().astype(np.int64))
        held = [rule.device(int(k))[2:] for k in chosen]
        self.x_test = np.concatenate([x for x, _ in held])
        self.y_test = np.concatenate([y for _, y in held])
        if len(self.y_test) == 0:
            raise ValueError(
                f"test_fraction={rule.test_fraction} holds out no sample of devices this small; "
                "raise test_fraction or samples_per_device"
            )
        self.test_devices = len(chosen)

    def client_samples(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        x, y, _, _ = self.rule.device(client)
        return x, y

    def client_size(self, client: int) -> int:
        return self.rule.train_size(client)


@functools.cache
def _shared_model(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic-IID's one model, W and b ~ N(0, 1), shared by every device."""
    rng = np.random.default_rng([seed, zlib.crc32(b"iid-model")])
    weights = rng.standard_normal((NUM_CLASSES, DIMENSION), dtype=np.float32)
    return weights, rng.standard_normal(NUM_CLASSES, dtype=np.float32)


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
