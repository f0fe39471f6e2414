"""Where each dataset's files come from, where fedsim looks for them, and what it says
when they are missing or corrupt.

This module is the one place for those errors: every loader calls :func:`locate` to
find its files and :func:`corrupt_file` when a file does not parse, so every message has
the same shape (one line, the expected files, the folders searched, where to get them).

Checksums are the published ones: SHA-256 from TensorFlow Datasets' url_checksums
(which pins these same URLs), MD5 from torchvision's loaders where no SHA-256 is
published. ``None`` means no checksum is known; the downloader then says so.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsim.data.cache import cache_dir
from fedsim.errors import UserError
from fedsim.registry import did_you_mean

Entry = str | tuple[str, ...]  # a required file or folder, or alternative names for it


@dataclass(frozen=True)
class Resource:
    """One file to download: its URL, its name on disk and its published checksum."""

    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    unpack: bool = False  # a .tar.gz or .zip archive to unpack beside it


@dataclass(frozen=True)
class Source:
    """A dataset's files: the folders searched under ``root`` and where the files come from.

    ``folder`` (relative to ``root``) is where ``fedsim data download`` puts the files;
    ``search`` lists the folders tried, in order, when loading (archives unpack into a
    subfolder, and users often point ``root`` straight at the files). ``manual`` says why
    a dataset has no automatic download (for example, it is only on Google Drive).
    """

    name: str
    homepage: str
    expected: str  # the files as a person would list them, for messages
    folder: str
    search: tuple[str, ...]
    resources: tuple[Resource, ...] = ()
    manual: str = ""
    notes: tuple[str, ...] = field(default=())


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root`` if given, else ``$FEDSIM_DATA``, else ``<cache>/data`` (see :func:`cache_dir`)."""
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("FEDSIM_DATA") or cache_dir() / "data")


def how_to_get(source: Source, root: Path, what: str = "them") -> str:
    """ "get them from <homepage> or run: fedsim data download ..." for error messages."""
    where = f"get {what} from {source.homepage}"
    if source.resources:
        return f"{where} or run: fedsim data download {source.name} --root {root}"
    return f"{where} ({source.manual})" if source.manual else where


@dataclass(frozen=True)
class Located:
    """The folder holding a dataset's files, which layout matched, and each file's path."""

    folder: Path
    layout: int
    paths: dict[str, Path]  # keyed by the first name of each entry

    def __getitem__(self, name: str) -> Path:
        return self.paths[name]


def locate(source: Source, root: str | os.PathLike[str] | None, layouts: Sequence[Sequence[Entry]]) -> Located:
    """Find the first searched folder that holds every entry of one of ``layouts``.

    Names match exactly, or else ignoring case and punctuation ("Real World" finds
    ``Real_World``; ``train-images.idx3-ubyte`` finds ``train-images-idx3-ubyte``).
    Raises a one-line UserError naming the missing files, the folders searched and where
    to get them.
    """
    base = data_root(root)
    folders = [base / relative for relative in source.search]
    for folder in folders:
        for number, layout in enumerate(layouts):
            paths = {_names(entry)[0]: find_entry(folder, entry) for entry in layout}
            if all(path is not None for path in paths.values()):
                return Located(folder, number, paths)  # type: ignore[arg-type]
    existing = [folder for folder in folders if folder.is_dir()]
    closest = existing[0] if existing else folders[0]
    missing = [_names(entry)[0] for entry in layouts[0] if find_entry(closest, entry) is None]
    also = [folder for folder in dict.fromkeys(folders) if folder != closest]
    if len(missing) == len(layouts[0]):  # nothing there: name the whole expected set once
        raise missing_files(source, closest, [source.expected], root, also=also, partly=False)
    raise missing_files(source, closest, missing, root, also=also)


def missing_files(
    source: Source,
    folder: Path,
    names: Sequence[str],
    root: str | os.PathLike[str] | None,
    also: Sequence[Path] = (),
    partly: bool = True,
) -> UserError:
    """The error for files or folders that are not where they should be; the caller raises it.

    ``partly``: some of the expected files are there, so the message also lists them all.
    """
    searched = f" (also searched {', '.join(map(str, also))})" if also else ""
    expected = f"; expected {source.expected}" if partly else ""
    return UserError(
        f"{source.name}: missing {', '.join(names)} in {folder}{searched}{expected}; "
        f"{how_to_get(source, data_root(root))}"
    )


def corrupt_file(source: Source, path: Path, reason: str, root: str | os.PathLike[str] | None = None) -> UserError:
    """The error for a file that exists but does not parse; the caller raises it."""
    return UserError(
        f"{source.name}: {path} is corrupt or not the expected file ({reason}); "
        f"delete it and {how_to_get(source, data_root(root), 'it again')}"
    )


def _names(entry: Entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else entry


def _normal(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_entry(folder: Path, entry: Entry) -> Path | None:
    """The path of ``entry`` (a name, or alternative names) in ``folder``, or None."""
    names = _names(entry)
    for name in names:
        if (folder / name).exists():
            return folder / name
    if not folder.is_dir():
        return None
    wanted = {_normal(name): rank for rank, name in enumerate(names)}
    matches = sorted(
        (wanted[_normal(child.name)], child) for child in folder.iterdir() if _normal(child.name) in wanted
    )
    return matches[0][1] if matches else None


def _idx_source(name: str, homepage: str, base_url: str, sha256: dict[str, str]) -> Source:
    files = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    return Source(
        name=name,
        homepage=homepage,
        expected=", ".join(files) + " (gzipped or not)",
        folder=name,
        search=(name, "."),
        resources=tuple(Resource(base_url + file, file, sha256=sha256[file]) for file in files),
    )


_DOMAINNET_URL = "http://csr.bu.edu/ftp/visda/2019/multi-source/"

SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        # The original host http://yann.lecun.com/exdb/mnist/ now refuses downloads; TFDS and
        # torchvision use Google's CVDF mirror of the same files.
        _idx_source(
            "mnist",
            "http://yann.lecun.com/exdb/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            {
                "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            },
        ),
        _idx_source(
            "fashion-mnist",
            "https://github.com/zalandoresearch/fashion-mnist",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            {
                "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            },
        ),
        _idx_source(
            "kmnist",
            "https://github.com/rois-codh/kmnist",
            "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
            {
                "train-images-idx3-ubyte.gz": "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
                "train-labels-idx1-ubyte.gz": "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
                "t10k-images-idx3-ubyte.gz": "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
                "t10k-labels-idx1-ubyte.gz": "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
            },
        ),
        Source(
            name="usps",
            homepage="https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps",
            expected="usps.bz2 and usps.t.bz2 (LIBSVM format), or usps.h5 (the Kaggle HDF5 file)",
            folder="usps",
            search=("usps", "."),
            # No SHA-256 is published for these files; the MD5s are torchvision's.
            resources=(
                Resource(
                    "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.bz2",
                    "usps.bz2",
                    md5="ec16c51db3855ca6c91edd34d0e9b197",
                ),
                Resource(
                    "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.t.bz2",
                    "usps.t.bz2",
                    md5="8ea070ee2aca1ac39742fdd1ef5ed118",
                ),
            ),
        ),
        Source(
            name="svhn",
            homepage="http://ufldl.stanford.edu/housenumbers/",
            expected="train_32x32.mat and test_32x32.mat (format 2, cropped digits)",
            folder="svhn",
            search=("svhn", "."),
            resources=(
                Resource(
                    "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                    "train_32x32.mat",
                    sha256="435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8",
                ),
                Resource(
                    "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                    "test_32x32.mat",
                    sha256="cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b",
                ),
            ),
            notes=("extra_32x32.mat (1.3 GB, sha256 a133a4be...1eb3) is not downloaded; put it beside the others",),
        ),
        Source(
            name="cifar10",
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            expected="cifar-10-batches-bin/data_batch_1.bin ... data_batch_5.bin and test_batch.bin (the binary version)",
            folder="cifar10",
            search=("cifar10/cifar-10-batches-bin", "cifar-10-batches-bin", "cifar10", "."),
            resources=(
                Resource(
                    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                    "cifar-10-binary.tar.gz",
                    sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                    md5="c32a1d4ab5d03f1284b67883e8d87530",
                    unpack=True,
                ),
            ),
        ),
        Source(
            name="cifar100",
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            expected="cifar-100-binary/train.bin and test.bin (the binary version)",
            folder="cifar100",
            search=("cifar100/cifar-100-binary", "cifar-100-binary", "cifar100", "."),
            resources=(
                Resource(
                    "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                    "cifar-100-binary.tar.gz",
                    sha256="58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
                    md5="03b5dce01913d631647c71ecec9e9cb8",
                    unpack=True,
                ),
            ),
        ),
        Source(
            name="office-caltech-10",
            homepage="https://github.com/med-air/FedBN",
            expected="amazon/, caltech/, dslr/, webcam/, each with one folder of images per class",
            folder="office-caltech-10",
            search=("office-caltech-10", "office_caltech_10", "OfficeCaltech10", "."),
            manual="FedBN's README links the image folders on Google Drive, which has no stable direct URL",
        ),
        Source(
            name="pacs",
            homepage="https://domaingeneralization.github.io/",
            expected="art_painting/, cartoon/, photo/, sketch/, each with one folder of images per class",
            folder="pacs",
            search=("pacs", "PACS", "pacs/kfold", "PACS/kfold", "kfold", "."),
            manual="the authors distribute it through Google Drive, which has no stable direct URL",
        ),
        Source(
            name="office-home",
            homepage="https://www.hemanthdv.org/officeHomeDataset.html",
            expected="Art/, Clipart/, Product/, 'Real World'/, each with one folder of images per class",
            folder="office-home",
            search=("office-home", "OfficeHomeDataset_10072016", "OfficeHome", "office_home", "."),
            manual="the authors distribute it after a form, through Google Drive",
        ),
        Source(
            name="domainnet",
            homepage="http://ai.bu.edu/M3SDA/",
            expected="clipart/, infograph/, painting/, quickdraw/, real/, sketch/, each with one folder of images per class",
            folder="domainnet",
            search=("domainnet", "DomainNet", "."),
            # The authors publish no checksums for these archives.
            resources=tuple(
                Resource(_DOMAINNET_URL + path, path.rsplit("/", 1)[-1], unpack=True)
                for path in (
                    "groundtruth/clipart.zip",
                    "infograph.zip",
                    "groundtruth/painting.zip",
                    "quickdraw.zip",
                    "real.zip",
                    "sketch.zip",
                )
            ),
            notes=("about 19 GB of zip archives; no checksums are published, so none are verified",),
        ),
    )
}


def source_for(name: str) -> Source:
    """The Source of a dataset that reads local files, or a UserError naming those that do."""
    if name not in SOURCES:
        raise UserError(
            f"{name!r} has no files to download{did_you_mean(name, SOURCES)} "
            f"(datasets with files: {', '.join(SOURCES)}; the others are embedded and need none)"
        )
    return SOURCES[name]
