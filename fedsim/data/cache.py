"""A disk cache for arrays that are slow to build (parsed files, generated domains)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from fedsim.atomic import write_npz


def cache_dir() -> Path:
    """``$FEDSIM_CACHE`` if set, else ``~/.cache/fedsim``."""
    return Path(os.environ.get("FEDSIM_CACHE", Path.home() / ".cache" / "fedsim"))


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load ``name``.npz from the cache, or build it, save it atomically and return it.

    A corrupt cache file is rebuilt rather than trusted.
    """
    path = cache_dir() / f"{name}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError):
            path.unlink(missing_ok=True)
    arrays = build()
    try:
        write_npz(path, arrays)
    except OSError:
        pass  # a read-only cache folder only costs speed
    return arrays


def fingerprint(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(path, size, modification time) of each file, for cache keys of parsed files: a
    replaced or re-downloaded file gets a new key, so its stale cache is never used."""
    result = []
    for path in paths:
        stat = Path(path).stat()
        result.append((str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))
    return result
