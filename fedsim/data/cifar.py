"""Loaders for CIFAR-10 and CIFAR-100, from their binary versions only.

The Python versions of CIFAR are pickles, and unpickling a downloaded file can run
arbitrary code, so fedsim never reads them. In the binary versions each record is its
label byte(s) followed by 3,072 pixel bytes: the red, green and blue 32x32 planes in
row-major order. CIFAR-10 records have one label byte; CIFAR-100 records have the
coarse (superclass) label, then the fine label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.data.dataset import Dataset
from fedsim.data.reading import official_split, read_cached
from fedsim.data.sources import SOURCES, Source, corrupt_file, locate
from fedsim.data.transforms import TransformSpec

PIXELS = 3 * 32 * 32
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# fine_label_names.txt of the binary version, in label order (alphabetical).
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
    can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
    dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
    lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
    pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
    seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
    tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
    worm""".split()
)


def load_cifar10(root: str | None = None, domains: tuple[TransformSpec, ...] = ()) -> Dataset:
    """CIFAR-10: 50,000 + 10,000 tiny photos, 32x32 RGB, 10 classes (binary version).

    Files: cifar-10-batches-bin/data_batch_1.bin ... data_batch_5.bin and test_batch.bin,
    i.e. cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html unpacked
    into ``root``/cifar10 (or ``root``), or ``fedsim data download cifar10``.
    """
    train = [f"data_batch_{number}.bin" for number in range(1, 6)]
    return _load(
        SOURCES["cifar10"],
        root,
        train,
        "test_batch.bin",
        _Records(1, 0, len(CIFAR10_CLASSES)),
        CIFAR10_CLASSES,
        domains,
    )


def load_cifar100(root: str | None = None, domains: tuple[TransformSpec, ...] = ()) -> Dataset:
    """CIFAR-100: 50,000 + 10,000 tiny photos, 32x32 RGB, 100 fine classes (binary version).

    Files: cifar-100-binary/train.bin and test.bin, i.e.
    cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html unpacked
    into ``root``/cifar100 (or ``root``), or ``fedsim data download cifar100``.
    """
    # Two label bytes per record: the coarse superclass, then the fine label used here.
    records = _Records(2, 1, len(CIFAR100_CLASSES))
    return _load(SOURCES["cifar100"], root, ["train.bin"], "test.bin", records, CIFAR100_CLASSES, domains)


@dataclass(frozen=True)
class _Records:
    label_bytes: int
    label_index: int
    num_classes: int


def _load(
    source: Source,
    root: str | None,
    train: list[str],
    test: str,
    records: _Records,
    classes: tuple[str, ...],
    domains: tuple[str, ...],
) -> Dataset:
    located = locate(source, root, [[*train, test]])

    def parse() -> dict[str, np.ndarray]:
        parts = [_read_records(source, located[name], records, root) for name in train]
        x_test, y_test = _read_records(source, located[test], records, root)
        return {
            "x_train": np.concatenate([x for x, _ in parts]),
            "y_train": np.concatenate([y for _, y in parts]),
            "x_test": x_test,
            "y_test": y_test,
        }

    arrays = read_cached(source, located.paths.values(), {}, parse)
    return official_split(source.name, arrays, classes, domains)


def _read_records(source: Source, path: Path, records: _Records, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and int64 labels of one binary file."""
    raw = np.fromfile(path, dtype=np.uint8)
    size = records.label_bytes + PIXELS
    if raw.size == 0 or raw.size % size:
        raise corrupt_file(source, path, f"{raw.size} bytes is not a whole number of {size}-byte records", root)
    rows = raw.reshape(-1, size)
    labels = rows[:, records.label_index].astype(np.int64)
    if labels.max() >= records.num_classes:
        raise corrupt_file(source, path, f"label {labels.max()} is not below {records.num_classes}", root)
    return np.ascontiguousarray(rows[:, records.label_bytes :].reshape(-1, 3, 32, 32)), labels
