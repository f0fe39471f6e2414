"""Every file loader, on tiny files written here in the real formats: IDX (MNIST, Fashion-MNIST,
KMNIST), LIBSVM bz2 and HDF5 (USPS), MATLAB (SVHN), CIFAR binary, and image folders."""

from __future__ import annotations

import bz2
import gzip
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fedsim.data
from fedsim.data import DATASETS, load_dataset
from fedsim.errors import UserError


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDSIM_CACHE", str(cache))
    monkeypatch.delenv("FEDSIM_DATA", raising=False)
    monkeypatch.setattr(fedsim.data, "_LOADED", {})
    return cache


def cached_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.npz")) if cache.exists() else []


# --- IDX ------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train: int = 12, n_test: int = 6, compress: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        data = idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
def test_idx_datasets_read_pixels_and_labels_exactly(tmp_path, name):
    arrays = write_idx_set(tmp_path / name)
    dataset = load_dataset(name, root=str(tmp_path))
    assert dataset.x_train.shape == (12, 1, 28, 28) and dataset.x_train.dtype == np.float32
    np.testing.assert_allclose(dataset.x_train[:, 0] * 255, arrays["train-images-idx3-ubyte"], atol=1e-3)
    np.testing.assert_array_equal(dataset.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert dataset.y_train.dtype == np.int64
    assert dataset.classes == DATASETS[name].classes and len(dataset.classes) == 10


def test_idx_reads_uncompressed_files_directly_in_root(tmp_path):
    arrays = write_idx_set(tmp_path, compress=False)
    dataset = load_dataset("mnist", root=str(tmp_path))
    np.testing.assert_array_equal(dataset.y_train, arrays["train-labels-idx1-ubyte"])


def test_missing_files_name_the_files_the_root_and_the_download(tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(UserError) as error:
        load_dataset("mnist", root=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    missing, expected = message.split("; expected ")[0], message.split("; expected ")[1]
    assert "t10k-images-idx3-ubyte.gz" in missing and "train-labels-idx1-ubyte.gz" in missing
    assert "train-images-idx3-ubyte.gz" not in missing  # present, so not listed as missing
    assert expected.startswith("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images")
    assert str(tmp_path / "mnist") in message
    assert "http://yann.lecun.com/exdb/mnist/" in message
    assert f"fedsim data download mnist --root {tmp_path}" in message


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated gzip stream
        lambda data: gzip.compress(gzip.decompress(data)[:-10]),  # fewer pixels than the header says
        lambda data: gzip.compress(b"\x00\x00\x0d\x03" + gzip.decompress(data)[4:]),  # float type code
    ],
)
def test_corrupt_idx_file_is_one_line_and_leaves_no_cache(tmp_path, isolated_cache, damage):
    write_idx_set(tmp_path / "mnist")
    images = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    images.write_bytes(damage(images.read_bytes()))
    with pytest.raises(UserError) as error:
        load_dataset("mnist", root=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "corrupt" in message and str(images) in message
    assert "fedsim data download mnist" in message
    assert cached_files(isolated_cache) == []


def test_parsed_files_are_cached_and_a_replaced_file_is_read_again(tmp_path, isolated_cache):
    write_idx_set(tmp_path / "mnist", seed=0)
    first = load_dataset("mnist", root=str(tmp_path))
    assert len(cached_files(isolated_cache)) == 1
    fedsim.data._LOADED.clear()
    replaced = write_idx_set(tmp_path / "mnist", n_train=20, seed=1)
    second = load_dataset("mnist", root=str(tmp_path))
    assert len(second.y_train) == 20 != len(first.y_train)
    np.testing.assert_allclose(second.x_train[:, 0] * 255, replaced["train-images-idx3-ubyte"], atol=1e-3)


def test_file_loaders_accept_transform_domains(tmp_path):
    write_idx_set(tmp_path / "kmnist", n_train=40, n_test=20)
    dataset = load_dataset("kmnist", root=str(tmp_path), domains=["identity", "invert"])
    assert dataset.domains == ("identity", "invert")
    assert set(np.unique(dataset.domain_train)) == {0, 1}


# --- USPS -----------------------------------------------------------------------------


def write_usps_libsvm(path: Path, images: np.ndarray, labels: np.ndarray, compress: bool = True) -> None:
    lines = []
    for image, label in zip(images, labels):
        values = image.reshape(-1) / 255.0 * 2 - 1  # LIBSVM's copy is scaled to [-1, 1]
        features = " ".join(f"{index + 1}:{value:.6f}" for index, value in enumerate(values) if value != 0)
        lines.append(f"{label + 1} {features}")  # labels 1-10 stand for digits 0-9
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(bz2.compress(data) if compress else data)


def test_usps_reads_libsvm_bz2(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (10, 16, 16)), rng.integers(0, 256, (5, 16, 16))
    train[0, 0, 0] = 128  # exactly 0 in [-1, 1]: LIBSVM leaves it out, and it must read back as mid-grey
    (tmp_path / "usps").mkdir()
    write_usps_libsvm(tmp_path / "usps" / "usps.bz2", train, np.arange(10))
    write_usps_libsvm(tmp_path / "usps" / "usps.t.bz2", test, np.array([9, 0, 1, 2, 3]), compress=False)
    dataset = load_dataset("usps", root=str(tmp_path))
    assert dataset.x_train.shape == (10, 1, 16, 16)
    np.testing.assert_allclose(dataset.x_train[:, 0] * 255, train, atol=0.51)
    np.testing.assert_array_equal(dataset.y_train, np.arange(10))
    np.testing.assert_array_equal(dataset.y_test, [9, 0, 1, 2, 3])


def test_usps_corrupt_bz2_is_reported(tmp_path, isolated_cache):
    (tmp_path / "usps").mkdir()
    write_usps_libsvm(tmp_path / "usps" / "usps.bz2", np.zeros((2, 16, 16)), np.array([1, 2]))
    (tmp_path / "usps" / "usps.t.bz2").write_bytes(b"BZh9 definitely not bzip2")
    with pytest.raises(UserError, match=r"usps\.t\.bz2 is corrupt"):
        load_dataset("usps", root=str(tmp_path))
    assert cached_files(isolated_cache) == []


class _FakeH5File(dict):
    """Stands in for h5py.File (h5py is optional and may not be installed): a mapping of
    groups to arrays, used as a context manager like the real one."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_usps_reads_the_hdf5_layout_through_h5py(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    groups = {
        split: {"data": rng.random((n, 256)), "target": np.arange(n) % 10} for split, n in (("train", 8), ("test", 4))
    }
    opened = []

    def open_file(path, mode):
        opened.append((Path(path), mode))
        return _FakeH5File(groups)

    monkeypatch.setitem(sys.modules, "h5py", types.SimpleNamespace(File=open_file))
    (tmp_path / "usps.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    dataset = load_dataset("usps", root=str(tmp_path))
    assert opened == [(tmp_path / "usps.h5", "r")]
    np.testing.assert_allclose(dataset.x_test.reshape(4, 256), groups["test"]["data"], atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(dataset.y_train, np.arange(8) % 10)


def test_usps_hdf5_without_h5py_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    (tmp_path / "usps.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(UserError, match=r"needs h5py \(pip install h5py\).*usps\.bz2"):
        load_dataset("usps", root=str(tmp_path))


# --- SVHN -----------------------------------------------------------------------------


def write_svhn(folder: Path, name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]  # 10 stands for the digit 0
    folder.mkdir(parents=True, exist_ok=True)
    savemat(folder / name, {"X": x, "y": y})
    return x, y


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path):
    x, y = write_svhn(tmp_path / "svhn", "train_32x32.mat", 11, 0)
    write_svhn(tmp_path / "svhn", "test_32x32.mat", 4, 1)
    dataset = load_dataset("svhn", root=str(tmp_path))
    assert dataset.x_train.shape == (11, 3, 32, 32)
    np.testing.assert_allclose(dataset.x_train[3] * 255, x[:, :, :, 3].transpose(2, 0, 1), atol=1e-3)
    np.testing.assert_array_equal(dataset.y_train, y[:, 0] % 10)
    assert dataset.y_train[9] == 0


def test_svhn_extra_adds_to_training(tmp_path):
    write_svhn(tmp_path, "train_32x32.mat", 5, 0)
    write_svhn(tmp_path, "test_32x32.mat", 3, 1)
    with pytest.raises(UserError, match="missing extra_32x32.mat"):
        load_dataset("svhn", root=str(tmp_path), extra=True)
    write_svhn(tmp_path, "extra_32x32.mat", 7, 2)
    assert len(load_dataset("svhn", root=str(tmp_path), extra=True).y_train) == 12


def test_svhn_corrupt_mat_is_reported(tmp_path, isolated_cache):
    write_svhn(tmp_path / "svhn", "train_32x32.mat", 5, 0)
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(UserError, match=r"test_32x32\.mat is corrupt"):
        load_dataset("svhn", root=str(tmp_path))
    assert cached_files(isolated_cache) == []


# --- CIFAR ----------------------------------------------------------------------------


def cifar_records(images: np.ndarray, *label_columns: np.ndarray) -> bytes:
    labels = np.stack(label_columns, axis=1).astype(np.uint8)
    return np.concatenate([labels, images.reshape(len(images), -1)], axis=1).astype(np.uint8).tobytes()


def test_cifar10_reads_the_binary_batches(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = []
    for number in range(1, 6):
        images, labels = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 3)
        (folder / f"data_batch_{number}.bin").write_bytes(cifar_records(images, labels))
        batches.append((images, labels))
    test_images = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    (folder / "test_batch.bin").write_bytes(cifar_records(test_images, np.array([4, 9])))
    dataset = load_dataset("cifar10", root=str(tmp_path))
    assert dataset.x_train.shape == (15, 3, 32, 32)
    np.testing.assert_allclose(dataset.x_train[6:9] * 255, batches[2][0], atol=1e-3)  # planes R, G, B in order
    np.testing.assert_array_equal(dataset.y_train, np.concatenate([labels for _, labels in batches]))
    np.testing.assert_array_equal(dataset.y_test, [4, 9])
    assert dataset.classes[0] == "airplane"


def test_cifar100_uses_the_fine_label(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    images = np.zeros((3, 3, 32, 32), dtype=np.uint8)
    (folder / "train.bin").write_bytes(cifar_records(images, np.array([19, 0, 5]), np.array([99, 0, 42])))
    (folder / "test.bin").write_bytes(cifar_records(images[:1], np.array([3]), np.array([7])))
    dataset = load_dataset("cifar100", root=str(tmp_path))
    np.testing.assert_array_equal(dataset.y_train, [99, 0, 42])
    assert len(dataset.classes) == 100 and dataset.classes[99] == "worm" and dataset.classes[42] == "leopard"


def test_cifar_truncated_batch_is_reported(tmp_path, isolated_cache):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    images = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    (folder / "train.bin").write_bytes(cifar_records(images, np.array([1, 1]), np.array([1, 1]))[:-100])
    (folder / "test.bin").write_bytes(cifar_records(images, np.array([1, 1]), np.array([1, 1])))
    with pytest.raises(UserError, match=r"train\.bin is corrupt.*whole number of 3074-byte records"):
        load_dataset("cifar100", root=str(tmp_path))
    assert cached_files(isolated_cache) == []


def test_cifar_never_reads_the_pickled_python_version(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (folder / name).write_bytes(b"\x80\x04 pickle that must not be loaded")
    with pytest.raises(UserError, match=r"missing cifar-10-batches-bin/data_batch_1\.bin .*binary version"):
        load_dataset("cifar10", root=str(tmp_path))


# --- image folders --------------------------------------------------------------------


def write_image_folders(base: Path, domains: dict[str, str], classes: list[str], per_class: int = 3) -> dict:
    """Solid-colour images whose colour encodes (domain, class), in mixed sizes and formats."""
    colours = {}
    for d, (domain, folder_name) in enumerate(domains.items()):
        for c, name in enumerate(classes):
            folder = base / folder_name / name
            folder.mkdir(parents=True)
            colour = (40 * d + 20, 20 * c + 10, 200)
            colours[(domain, name)] = colour
            for k in range(per_class):
                size = (50 + 17 * k, 30 + 11 * k)
                suffix = ".png" if k % 2 else ".jpg"
                Image.new("RGB", size, colour).save(folder / f"img{k}{suffix}")
    return colours


def test_image_folder_dataset_resizes_labels_and_sets_domains(tmp_path):
    classes = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    folders = {"art_painting": "art_painting", "cartoon": "cartoon", "photo": "photo", "sketch": "sketch"}
    colours = write_image_folders(tmp_path / "PACS" / "kfold", folders, classes)
    dataset = load_dataset("pacs", root=str(tmp_path), image_size=16, domains=["sketch", "photo"])
    assert dataset.x_train.shape[1:] == (3, 16, 16)
    assert dataset.domains == ("sketch", "photo")
    assert len(dataset.y_train) + len(dataset.y_test) == 2 * 7 * 3
    for x, y, d in zip(dataset.x_train, dataset.y_train, dataset.domain_train):
        expected = np.array(colours[(dataset.domains[d], classes[y])]) / 255.0
        np.testing.assert_allclose(x.mean(axis=(1, 2)), expected, atol=3 / 255)  # JPEG is lossy
    assert set(np.unique(dataset.domain_test)) == {0, 1}


def test_image_folder_names_match_ignoring_case_and_punctuation(tmp_path):
    classes = ["Alarm_Clock", "Backpack"]
    write_image_folders(tmp_path / "OfficeHomeDataset_10072016", {"real_world": "Real World", "art": "Art"}, classes)
    dataset = load_dataset(
        "office-home", root=str(tmp_path), domains=["art", "real_world"], classes=classes, image_size=8
    )
    assert dataset.classes == tuple(classes) and dataset.domains == ("art", "real_world")


def test_image_folder_missing_class_folder_is_named(tmp_path):
    write_image_folders(tmp_path / "domainnet", {"clipart": "clipart"}, ["bird"])
    with pytest.raises(UserError) as error:
        load_dataset("domainnet", root=str(tmp_path), domains=["clipart"], classes=["bird", "zebra"])
    assert "missing clipart/zebra/*.jpg" in str(error.value) and "http://ai.bu.edu/M3SDA/" in str(error.value)


def test_image_folder_corrupt_image_is_named_and_nothing_cached(tmp_path, isolated_cache):
    write_image_folders(tmp_path / "office-caltech-10", {"dslr": "dslr", "caltech": "caltech10"}, ["mug", "bike"])
    broken = tmp_path / "office-caltech-10" / "caltech10" / "mug" / "img2.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(UserError) as error:
        load_dataset("office-caltech-10", root=str(tmp_path), domains=["dslr", "caltech"], classes=["mug", "bike"])
    assert str(broken) in str(error.value) and "corrupt" in str(error.value)
    assert cached_files(isolated_cache) == []


def test_image_folder_unknown_class_fails_validation(tmp_path):
    with pytest.raises(UserError, match=r"\[dataset\] classes"):
        load_dataset("pacs", root=str(tmp_path), classes=["dog", "cat"])
