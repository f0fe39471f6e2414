"""Loader for SVHN (Street View House Numbers), format 2: cropped 32x32 colour digits.

Each split is a MATLAB v5 file read with SciPy: ``X`` of shape (32, 32, 3, N) uint8 and
``y`` of shape (N, 1) with labels 1-10, where 10 stands for the digit 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.data.dataset import Dataset
from fedsim.data.embedded import DIGIT_CLASSES
from fedsim.data.reading import official_split, read_cached
from fedsim.data.sources import SOURCES, corrupt_file, locate
from fedsim.data.transforms import TransformSpec

SOURCE = SOURCES["svhn"]


def load_svhn(root: str | None = None, extra: bool = False, domains: tuple[TransformSpec, ...] = ()) -> Dataset:
    """SVHN: 73,257 + 26,032 house-number digits, 32x32 RGB (format 2, cropped digits).

    Files: train_32x32.mat and test_32x32.mat (and extra_32x32.mat with ``extra = true``,
    which adds its 531,131 easier digits to training) in ``root``/svhn or ``root``, from
    http://ufldl.stanford.edu/housenumbers/, or ``fedsim data download svhn``.
    """
    files = ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if extra else [])
    located = locate(SOURCE, root, [files])

    def parse() -> dict[str, np.ndarray]:
        train = [_read_mat(located[name], root) for name in files if name != "test_32x32.mat"]
        x_test, y_test = _read_mat(located["test_32x32.mat"], root)
        return {
            "x_train": np.concatenate([x for x, _ in train]),
            "y_train": np.concatenate([y for _, y in train]),
            "x_test": x_test,
            "y_test": y_test,
        }

    arrays = read_cached(SOURCE, located.paths.values(), {"extra": extra}, parse)
    return official_split("svhn", arrays, DIGIT_CLASSES, domains)


def _read_mat(path: Path, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        contents = loadmat(path, variable_names=["X", "y"])
        x, y = contents["X"], contents["y"]
    except Exception as error:  # SciPy raises many types on a damaged file (even IndexError)
        raise corrupt_file(SOURCE, path, f"not a MATLAB file with X and y: {error}", root) from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8 or y.size != x.shape[3]:
        raise corrupt_file(SOURCE, path, f"X has shape {x.shape} ({x.dtype}) for {y.size} labels", root)
    labels = y.astype(np.int64).ravel()
    if labels.min() < 1 or labels.max() > 10:
        raise corrupt_file(SOURCE, path, "labels outside 1-10", root)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels % 10
