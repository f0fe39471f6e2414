"""Loader for USPS, the US Postal Service's handwritten zip-code digits, 16x16 grey.

Two common distributions are read:

* LIBSVM's ``usps.bz2`` (7,291 training digits) and ``usps.t.bz2`` (2,007 test digits),
  bzip2-compressed or not: one line per digit, ``label index:value ...``, labels 1-10
  for the digits 0-9, values scaled to [-1, 1]. Parsed with scikit-learn's
  ``load_svmlight_file``.
* Kaggle's ``usps.h5`` (groups ``train`` and ``test``, each with ``data`` of shape
  (N, 256) in [0, 1] and ``target`` 0-9). Reading it needs the optional h5py package.
"""

from __future__ import annotations

import bz2
from pathlib import Path

import numpy as np

from fedsim.data.dataset import Dataset
from fedsim.data.embedded import DIGIT_CLASSES
from fedsim.data.images import to_uint8
from fedsim.data.reading import official_split, read_cached
from fedsim.data.sources import SOURCES, corrupt_file, locate
from fedsim.data.transforms import TransformSpec
from fedsim.errors import UserError

SOURCE = SOURCES["usps"]
SIDE = 16
_LIBSVM = [("usps.bz2", "usps"), ("usps.t.bz2", "usps.t")]
_HDF5 = ["usps.h5"]


def load_usps(root: str | None = None, domains: tuple[TransformSpec, ...] = ()) -> Dataset:
    """USPS: 7,291 + 2,007 handwritten digits, 16x16 grey.

    Files: usps.bz2 and usps.t.bz2 from
    https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps (or
    ``fedsim data download usps``), or usps.h5 from
    https://www.kaggle.com/datasets/bistaumanga/usps-dataset (needs h5py), in
    ``root``/usps or ``root``.
    """
    located = locate(SOURCE, root, [_LIBSVM, _HDF5])
    if located.layout == 0:
        train, test = located["usps.bz2"], located["usps.t.bz2"]
        arrays = read_cached(SOURCE, [train, test], {}, lambda: _parse_libsvm(train, test, root))
    else:
        path = located["usps.h5"]
        arrays = read_cached(SOURCE, [path], {}, lambda: _parse_hdf5(path, root))
    return official_split("usps", arrays, DIGIT_CLASSES, domains)


def _parse_libsvm(train: Path, test: Path, root: str | None) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_svmlight_file

    arrays = {}
    for split, path in (("train", train), ("test", test)):
        try:
            with _open(path) as handle:
                x, y = load_svmlight_file(handle, n_features=SIDE * SIDE)
        except (OSError, EOFError, ValueError) as error:
            raise corrupt_file(SOURCE, path, f"not LIBSVM text: {error}", root) from None
        labels = y.astype(np.int64) - 1
        if len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
            raise corrupt_file(SOURCE, path, "labels outside 1-10", root)
        pixels = (x.toarray() + 1.0) / 2.0
        arrays[f"x_{split}"] = to_uint8(pixels).reshape(-1, 1, SIDE, SIDE)
        arrays[f"y_{split}"] = labels
    return arrays


def _open(path: Path):
    with path.open("rb") as handle:
        compressed = handle.read(3) == b"BZh"
    return bz2.open(path, "rb") if compressed else path.open("rb")


def _parse_hdf5(path: Path, root: str | None) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError:
        raise UserError(
            f"usps: reading {path} needs h5py (pip install h5py), or use LIBSVM's usps.bz2 and usps.t.bz2 "
            "instead (fedsim data download usps)"
        ) from None
    arrays = {}
    try:
        with h5py.File(path, "r") as handle:
            for split in ("train", "test"):
                pixels = np.asarray(handle[split]["data"][:], dtype=np.float64)
                labels = np.asarray(handle[split]["target"][:]).astype(np.int64).ravel()
                if pixels.ndim != 2 or pixels.shape[1] != SIDE * SIDE or len(pixels) != len(labels):
                    raise ValueError(f"{split}/data has shape {pixels.shape} for {len(labels)} labels")
                if labels.min() < 0 or labels.max() > 9:
                    raise ValueError(f"{split}/target holds labels outside 0-9")
                arrays[f"x_{split}"] = to_uint8(pixels).reshape(-1, 1, SIDE, SIDE)
                arrays[f"y_{split}"] = labels
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise corrupt_file(SOURCE, path, f"not the USPS HDF5 file: {error}", root) from None
    return arrays
