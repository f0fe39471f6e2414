"""Loaders for datasets in LeCun's IDX format: MNIST, Fashion-MNIST and KMNIST.

Each has four files, gzipped or not: train-images-idx3-ubyte, train-labels-idx1-ubyte,
t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte. An IDX file is a big-endian header
(two zero bytes, a type code, the number of dimensions, then each dimension as a 32-bit
integer) followed by the raw values; these datasets hold unsigned bytes (type 0x08).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedsim.data.dataset import Dataset
from fedsim.data.reading import official_split, read_cached
from fedsim.data.sources import SOURCES, Source, corrupt_file, locate
from fedsim.data.transforms import TransformSpec

FASHION_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Kuzushiji-MNIST: one cursive hiragana per class (お き す つ な は ま や れ を), romanised.
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
_UNSIGNED_BYTE = 0x08
_FILES = {
    "x_train": ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte"),
}


def load_mnist(root: str | None = None, domains: tuple[TransformSpec, ...] = ()) -> Dataset:
    """MNIST: 60,000 + 10,000 handwritten digits, 28x28 grey.

    Files: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
    t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in ``root``/mnist (or ``root``),
    from http://yann.lecun.com/exdb/mnist/ (mirror:
    https://storage.googleapis.com/cvdf-datasets/mnist/), or ``fedsim data download mnist``.
    """
    return _load_idx(SOURCES["mnist"], root, tuple(str(d) for d in range(10)), domains)


def load_fashion_mnist(root: str | None = None, domains: tuple[TransformSpec, ...] = ()) -> Dataset:
    """Fashion-MNIST: 60,000 + 10,000 Zalando article images, 28x28 grey, 10 classes.

    Files: the same four IDX names as MNIST, in ``root``/fashion-mnist (or ``root``), from
    https://github.com/zalandoresearch/fashion-mnist, or ``fedsim data download fashion-mnist``.
    """
    return _load_idx(SOURCES["fashion-mnist"], root, FASHION_CLASSES, domains)


def load_kmnist(root: str | None = None, domains: tuple[TransformSpec, ...] = ()) -> Dataset:
    """Kuzushiji-MNIST: 60,000 + 10,000 cursive Japanese characters, 28x28 grey, 10 classes.

    Files: the same four IDX names as MNIST, in ``root``/kmnist (or ``root``), from
    https://github.com/rois-codh/kmnist, or ``fedsim data download kmnist``.
    """
    return _load_idx(SOURCES["kmnist"], root, KMNIST_CLASSES, domains)


def _load_idx(source: Source, root: str | None, classes: tuple[str, ...], domains: tuple[str, ...]) -> Dataset:
    located = locate(source, root, [list(_FILES.values())])

    def parse() -> dict[str, np.ndarray]:
        arrays = {key: read_idx(source, located[names[0]], root) for key, names in _FILES.items()}
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise corrupt_file(
                    source, located[_FILES[f"x_{split}"][0]], f"{x.shape} images but {y.shape} labels", root
                )
            if y.size and y.max() >= len(classes):
                raise corrupt_file(source, located[_FILES[f"y_{split}"][0]], f"label {y.max()} out of range", root)
            arrays[f"x_{split}"] = np.ascontiguousarray(x[:, None])
            arrays[f"y_{split}"] = y.astype(np.int64)
        return arrays

    arrays = read_cached(source, located.paths.values(), {}, parse)
    return official_split(source.name, arrays, classes, domains)


def read_idx(source: Source, path: Path, root: str | None = None) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes as a uint8 array of its shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if _is_gzip(path) else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise corrupt_file(source, path, f"cannot decompress: {error}", root) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise corrupt_file(source, path, "no IDX header", root)
    if raw[2] != _UNSIGNED_BYTE:
        raise corrupt_file(source, path, f"IDX type 0x{raw[2]:02x}, expected unsigned bytes (0x08)", root)
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt_file(source, path, "truncated IDX header", root)
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) if shape else 1
    if len(raw) - header != expected:
        raise corrupt_file(source, path, f"{len(raw) - header} data bytes, the header says {expected}", root)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(2) == b"\x1f\x8b"
