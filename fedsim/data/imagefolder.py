"""Loaders for multi-domain image-folder datasets: Office-Caltech-10, PACS, Office-Home
and DomainNet.

Each is laid out as ``<domain>/<class>/<image>`` (JPEG or PNG). Images are decoded once
with Pillow, squashed to ``image_size`` x ``image_size`` RGB, and cached as uint8 .npz
keyed by the files' sizes and times, so later runs load in seconds. Folder names match
ignoring case and punctuation ("Real World" finds ``Real_World``). None of these datasets
ships a train/test split that all papers share, so fedsim uses its fixed
class-and-domain-stratified split (SPLIT_SEED) with ``test_fraction``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from fedsim.data.dataset import SPLIT_SEED, Dataset, stratified_split
from fedsim.data.images import resize_rgb, to_float
from fedsim.data.progress import progress_bar
from fedsim.data.reading import read_cached
from fedsim.data.sources import SOURCES, Source, corrupt_file, find_entry, locate, missing_files

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

ImageSize = Annotated[int, Field(ge=8, le=512)]
TestFraction = Annotated[float, Field(gt=0.0, lt=1.0)]

OFFICE_CALTECH_DOMAINS = ("amazon", "caltech", "dslr", "webcam")
OFFICE_CALTECH_CLASSES = (
    "back_pack",
    "bike",
    "calculator",
    "headphones",
    "keyboard",
    "laptop_computer",
    "monitor",
    "mouse",
    "mug",
    "projector",
)
PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
OFFICE_HOME_DOMAINS = ("art", "clipart", "product", "real_world")
OFFICE_HOME_CLASSES = tuple(
    """Alarm_Clock Backpack Batteries Bed Bike Bottle Bucket Calculator Calendar Candles Chair Clipboards
    Computer Couch Curtains Desk_Lamp Drill Eraser Exit_Sign Fan File_Cabinet Flipflops Flowers Folder Fork
    Glasses Hammer Helmet Kettle Keyboard Knives Lamp_Shade Laptop Marker Monitor Mop Mouse Mug Notebook
    Oven Pan Paper_Clip Pen Pencil Postit_Notes Printer Push_Pin Radio Refrigerator Ruler Scissors
    Screwdriver Shelf Sink Sneakers Soda Speaker Spoon TV Table Telephone ToothBrush Toys Trash_Can
    Webcam""".split()
)
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
# DomainNet has 345 classes; FedBN and FedWon use these ten, the default here.
DOMAINNET_FEDBN_CLASSES = (
    "bird",
    "feather",
    "headphones",
    "ice_cream",
    "teapot",
    "tiger",
    "whale",
    "windmill",
    "wine_glass",
    "zebra",
)

OfficeCaltechDomain = Literal[OFFICE_CALTECH_DOMAINS]  # type: ignore[valid-type]
OfficeCaltechClass = Literal[OFFICE_CALTECH_CLASSES]  # type: ignore[valid-type]
PacsDomain = Literal[PACS_DOMAINS]  # type: ignore[valid-type]
PacsClass = Literal[PACS_CLASSES]  # type: ignore[valid-type]
OfficeHomeDomain = Literal[OFFICE_HOME_DOMAINS]  # type: ignore[valid-type]
OfficeHomeClass = Literal[OFFICE_HOME_CLASSES]  # type: ignore[valid-type]
DomainNetDomain = Literal[DOMAINNET_DOMAINS]  # type: ignore[valid-type]

# Folder names seen in published copies that differ from the domain name by more than case
# and punctuation (those differences are ignored anyway).
_FOLDER_ALIASES = {"caltech": ("caltech", "caltech10")}


def load_office_caltech_10(
    root: str | None = None,
    domains: tuple[OfficeCaltechDomain, ...] = OFFICE_CALTECH_DOMAINS,
    classes: tuple[OfficeCaltechClass, ...] = OFFICE_CALTECH_CLASSES,
    image_size: ImageSize = 64,
    test_fraction: TestFraction = 0.2,
) -> Dataset:
    """Office-Caltech-10: 2,533 photos of 10 office objects in 4 domains (amazon, caltech, dslr, webcam).

    Files: ``root``/office-caltech-10/<domain>/<class>/*.jpg (or the same folders in
    ``root``), as distributed with FedBN: https://github.com/med-air/FedBN (Office-31's
    images from https://faculty.cc.gatech.edu/~judy/domainadapt/ plus Caltech-256's).
    """
    return load_image_folder(SOURCES["office-caltech-10"], root, domains, classes, image_size, test_fraction)


def load_pacs(
    root: str | None = None,
    domains: tuple[PacsDomain, ...] = PACS_DOMAINS,
    classes: tuple[PacsClass, ...] = PACS_CLASSES,
    image_size: ImageSize = 64,
    test_fraction: TestFraction = 0.2,
) -> Dataset:
    """PACS: 9,991 images of 7 classes in 4 domains (art_painting, cartoon, photo, sketch).

    Files: ``root``/pacs/<domain>/<class>/*.jpg (or PACS/, PACS/kfold/, or ``root``),
    from https://domaingeneralization.github.io/ (Li et al., 2017).
    """
    return load_image_folder(SOURCES["pacs"], root, domains, classes, image_size, test_fraction)


def load_office_home(
    root: str | None = None,
    domains: tuple[OfficeHomeDomain, ...] = OFFICE_HOME_DOMAINS,
    classes: tuple[OfficeHomeClass, ...] = OFFICE_HOME_CLASSES,
    image_size: ImageSize = 64,
    test_fraction: TestFraction = 0.2,
) -> Dataset:
    """Office-Home: 15,588 images of 65 classes in 4 domains (art, clipart, product, real_world).

    Files: ``root``/office-home/<Domain>/<Class>/*.jpg (or OfficeHomeDataset_10072016/,
    or ``root``) with the folders Art, Clipart, Product and "Real World", from
    https://www.hemanthdv.org/officeHomeDataset.html.
    """
    return load_image_folder(SOURCES["office-home"], root, domains, classes, image_size, test_fraction)


def load_domainnet(
    root: str | None = None,
    domains: tuple[DomainNetDomain, ...] = DOMAINNET_DOMAINS,
    classes: tuple[str, ...] = DOMAINNET_FEDBN_CLASSES,
    image_size: ImageSize = 64,
    test_fraction: TestFraction = 0.2,
) -> Dataset:
    """DomainNet: 345 classes in 6 domains; by default the 10 classes FedBN uses.

    Files: ``root``/domainnet/<domain>/<class>/*.jpg (or ``root``), the six archives
    clipart.zip ... sketch.zip from http://ai.bu.edu/M3SDA/ unpacked, or
    ``fedsim data download domainnet``. ``classes`` may name any of the 345 class folders.
    """
    return load_image_folder(SOURCES["domainnet"], root, domains, classes, image_size, test_fraction)


@dataclass(frozen=True)
class _Image:
    path: Path
    label: int
    domain: int


def load_image_folder(
    source: Source,
    root: str | None,
    domains: tuple[str, ...],
    classes: tuple[str, ...],
    image_size: int,
    test_fraction: float,
) -> Dataset:
    """A Dataset from ``<domain>/<class>/<image>`` folders; ids follow the given orders."""
    for kind, names in (("domains", domains), ("classes", classes)):
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{kind} = {list(names)} must name at least one {kind[:-1]}, each once")
    located = locate(source, root, [[_FOLDER_ALIASES.get(domain, domain) for domain in domains]])
    images = _list_images(source, root, located.folder, [located.paths[_first(domain)] for domain in domains], classes)
    options = {"domains": list(domains), "classes": list(classes), "image_size": image_size}
    arrays = read_cached(
        source, [image.path for image in images], options, lambda: _decode(source, root, images, image_size)
    )
    x_train, x_test, y_train, y_test, d_train, d_test = stratified_split(
        arrays["x"], arrays["y"], test_fraction, SPLIT_SEED, arrays["domain"]
    )
    return Dataset(
        source.name,
        to_float(x_train),
        y_train,
        to_float(x_test),
        y_test,
        tuple(classes),
        tuple(domains),
        d_train,
        d_test,
    )


def _first(domain: str) -> str:
    return _FOLDER_ALIASES.get(domain, (domain,))[0]


def _list_images(
    source: Source, root: str | None, folder: Path, domain_folders: list[Path], classes: tuple[str, ...]
) -> list[_Image]:
    images, missing = [], []
    for domain, domain_folder in enumerate(domain_folders):
        for label, name in enumerate(classes):
            class_folder = find_entry(domain_folder, name)
            files = [] if class_folder is None else sorted(_image_files(class_folder))
            if not files:
                missing.append(f"{domain_folder.name}/{name}/*.jpg")
            images.extend(_Image(path, label, domain) for path in files)
    if missing:
        shown = missing[:3] + ([f"and {len(missing) - 3} more"] if len(missing) > 3 else [])
        raise missing_files(source, folder, shown, root)
    return images


def _image_files(folder: Path) -> list[Path]:
    return [
        path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    ]


def _decode(source: Source, root: str | None, images: list[_Image], size: int) -> dict[str, np.ndarray]:
    x = np.empty((len(images), size, size, 3), dtype=np.uint8)
    with progress_bar(f"{source.name}: decoding images", len(images)) as advance:
        for index, image in enumerate(images):
            try:
                with Image.open(image.path) as opened:
                    x[index] = resize_rgb(opened, size)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                raise corrupt_file(source, image.path, f"not a readable image: {error}", root) from None
            advance(1)
    return {
        "x": np.ascontiguousarray(x.transpose(0, 3, 1, 2)),
        "y": np.array([image.label for image in images], dtype=np.int64),
        "domain": np.array([image.domain for image in images], dtype=np.int64),
    }
