"""The steps every loader of local files shares: parse once and cache, then build the Dataset.

A parse that fails raises before anything is written, and the cache is written
atomically, so a missing or corrupt file never leaves a partial cache behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.cache import cache_key, cached_arrays, fingerprint
from fedsim.data.dataset import Dataset
from fedsim.data.images import to_float
from fedsim.data.sources import Source
from fedsim.data.transforms import with_transform_domains

PARSE_VERSION = 1  # bump when a parser changes what it returns, to retire old caches


def read_cached(
    source: Source,
    files: Iterable[Path],
    options: Mapping[str, Any],
    parse: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """``parse()``'s arrays, cached under a key of the files' sizes and times and ``options``."""
    key = cache_key(PARSE_VERSION, source.name, fingerprint(files), dict(options))
    return cached_arrays(f"{source.name}-{key}", parse)


def official_split(
    name: str, arrays: Mapping[str, np.ndarray], classes: tuple[str, ...], domains: tuple[str, ...]
) -> Dataset:
    """A Dataset from uint8 (N, C, H, W) ``x_train``/``x_test`` and labels ``y_train``/``y_test``,
    keeping the files' own train/test split; ``domains`` are transform specs."""
    dataset = Dataset(
        name,
        to_float(arrays["x_train"]),
        arrays["y_train"].astype(np.int64),
        to_float(arrays["x_test"]),
        arrays["y_test"].astype(np.int64),
        classes,
    )
    return with_transform_domains(dataset, domains)
