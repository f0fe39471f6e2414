"""Named input transforms (corruptions) that turn any dataset into a multi-domain one.

A transform is written as a short spec: a name, optionally ``-`` and a number, and steps
joined by ``+``::

    identity            the images unchanged
    rotate-30           rotate by 30 degrees counter-clockwise (any angle; rotate-330 = -30)
    invert              1 - x
    noise-0.2           add Gaussian noise of standard deviation 0.2 (default 0.2)
    blur-1.5            Gaussian blur of standard deviation 1.5 pixels (default 1.0)
    contrast-0.4        scale each image's contrast about its mean by 0.4 (default 0.4)
    colour              paint the digit and the background in random colours (also "color");
                        a one-channel image becomes three channels
    rotate-45+noise-0.1 rotate, then add noise

Every transform is deterministic: ``transform(x, seed)`` returns the same array for the
same ``x`` and ``seed``, and keeps float images in [0, 1] and shape (N, C, H, W) (only
``colour`` changes C, from 1 to 3). Drift streams apply these same objects to a client's
view; :func:`with_transform_domains` uses them for ``[dataset] domains = [...]``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated

import numpy as np
from pydantic import AfterValidator

from fedsim.data.dataset import SPLIT_SEED, Dataset
from fedsim.registry import did_you_mean

if TYPE_CHECKING:  # only the type: partitioners build on fedsim.data, not the other way
    from partitioners.base import ClientView

Step = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _identity(x: np.ndarray, _: float, __: np.random.Generator) -> np.ndarray:
    return x


def _rotate(x: np.ndarray, degrees: float, _: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    return ndimage.rotate(x, degrees, axes=(-1, -2), reshape=False, order=1, mode="constant", cval=0.0)


def _invert(x: np.ndarray, _: float, __: np.random.Generator) -> np.ndarray:
    return 1.0 - x


def _noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, sigma, size=x.shape).astype(x.dtype)


def _blur(x: np.ndarray, sigma: float, _: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest")


def _contrast(x: np.ndarray, factor: float, _: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return mean + factor * (x - mean)


def _colour(x: np.ndarray, _: float, rng: np.random.Generator) -> np.ndarray:
    """Paint the ink and the paper: grey level g becomes (1 - g) * paper + g * ink.

    Ink and paper colours are drawn per image, and redrawn until their brightness
    differs by at least 0.3, so that the digit stays visible.
    """
    grey = x.mean(axis=1, keepdims=True)
    n = len(x)
    ink, paper = rng.random((n, 3)), rng.random((n, 3))
    weights = np.array([0.299, 0.587, 0.114])
    for _attempt in range(100):
        dim = np.abs((ink - paper) @ weights) < 0.3
        if not dim.any():
            break
        ink[dim], paper[dim] = rng.random((dim.sum(), 3)), rng.random((dim.sum(), 3))
    ink, paper = ink.astype(x.dtype)[:, :, None, None], paper.astype(x.dtype)[:, :, None, None]
    return (1.0 - grey) * paper + grey * ink


@dataclass(frozen=True)
class _Kind:
    step: Step
    default: float | None  # None: the step takes no number
    needs_number: bool = False


TRANSFORMS: dict[str, _Kind] = {
    "identity": _Kind(_identity, None),
    "rotate": _Kind(_rotate, None, needs_number=True),
    "invert": _Kind(_invert, None),
    "noise": _Kind(_noise, 0.2),
    "blur": _Kind(_blur, 1.0),
    "contrast": _Kind(_contrast, 0.4),
    "colour": _Kind(_colour, None),
    "color": _Kind(_colour, None),
}


@dataclass(frozen=True)
class InputTransform:
    """A parsed transform spec: call it on float (N, C, H, W) arrays with a seed."""

    spec: str
    steps: tuple[tuple[str, float], ...]

    def __call__(self, x: np.ndarray, seed: int = 0) -> np.ndarray:
        if x.ndim != 4:
            raise ValueError(f"transform {self.spec!r} needs images of shape (N, C, H, W), got {x.shape}")
        rng = np.random.default_rng([seed, zlib.crc32(self.spec.encode())])
        out = x.astype(np.float32, copy=True)
        for name, number in self.steps:
            out = TRANSFORMS[name].step(out, number, rng)
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)

    def output_channels(self, channels: int) -> int:
        recolours = any(name in ("colour", "color") for name, _ in self.steps)
        return 3 if recolours else channels


def parse_transform(spec: str) -> InputTransform:
    """Parse a spec such as ``"rotate-30+noise-0.1"``; a ValueError says what is wrong."""
    steps = []
    for part in str(spec).strip().split("+"):
        name, dash, number_text = part.strip().partition("-")
        if name not in TRANSFORMS:
            raise ValueError(
                f"unknown transform {name!r} in {spec!r}{did_you_mean(name, TRANSFORMS)} "
                f"(choose from: {', '.join(TRANSFORMS)}; e.g. rotate-30, noise-0.2, invert+blur-1)"
            )
        kind = TRANSFORMS[name]
        if not dash:
            if kind.needs_number:
                raise ValueError(f"transform {part!r} needs a number, e.g. {name}-30")
            steps.append((name, kind.default if kind.default is not None else 0.0))
            continue
        if kind.default is None and not kind.needs_number:
            raise ValueError(f"transform {name!r} takes no number (write {name!r}, not {part!r})")
        try:
            number = float(number_text)
        except ValueError:
            raise ValueError(f"transform {part!r}: {number_text!r} is not a number") from None
        if name != "rotate" and not number > 0:
            raise ValueError(f"transform {part!r}: the number must be positive")
        steps.append((name, number))
    return InputTransform(str(spec), tuple(steps))


def _checked_spec(spec: str) -> str:
    parse_transform(spec)
    return spec


TransformSpec = Annotated[str, AfterValidator(_checked_spec)]
"""A transform spec as a loader parameter type: config validation parses it up front."""


def with_transform_domains(dataset: Dataset, specs: Sequence[str]) -> Dataset:
    """One domain per spec, each a disjoint, class-stratified share of the data.

    Shares rather than transformed copies: a copy would put the same image in every
    domain, so a model could match clients' data across domains sample by sample. Train
    and test are each dealt out the same way, so every domain has both. When some
    transform yields three channels (``colour``), one-channel domains are repeated to
    three so that all domains share one shape. With no specs the dataset is returned as is.
    """
    if not specs:
        return dataset
    if len(set(specs)) != len(specs):
        raise ValueError(f"domains = {list(specs)} names a domain twice")
    if dataset.domains:
        raise ValueError(
            f"{dataset.name} already has domains ({', '.join(dataset.domains)}); "
            "corruption domains apply to single-domain datasets"
        )
    transforms = [parse_transform(spec) for spec in specs]
    channels = max(t.output_channels(dataset.x_train.shape[1]) for t in transforms)
    parts = {}
    for split, x, y in (("train", dataset.x_train, dataset.y_train), ("test", dataset.x_test, dataset.y_test)):
        domain = _deal(y, len(specs), seed=zlib.crc32(split.encode()))
        images = np.empty((len(y), channels, *x.shape[2:]), dtype=np.float32)
        for number, transform in enumerate(transforms):
            members = np.flatnonzero(domain == number)
            shifted = transform(x[members], seed=zlib.crc32(f"{SPLIT_SEED}/{split}/{number}".encode()))
            images[members] = np.broadcast_to(shifted, (len(members), channels, *x.shape[2:]))
        parts[split] = (images, domain)
    return replace(
        dataset,
        x_train=parts["train"][0],
        x_test=parts["test"][0],
        domains=tuple(specs),
        domain_train=parts["train"][1],
        domain_test=parts["test"][1],
    )


def _deal(y: np.ndarray, shares: int, seed: int) -> np.ndarray:
    """A domain id per sample: each class shuffled and dealt round-robin into ``shares``."""
    rng = np.random.default_rng([SPLIT_SEED, seed])
    domain = np.empty(len(y), dtype=np.int64)
    offset = 0
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        domain[members] = (np.arange(len(members)) + offset) % shares
        offset += len(members)  # rotate the start so small classes do not all favour domain 0
    return domain


def view_samples(
    dataset: Dataset,
    view: ClientView,
    label_maps: np.ndarray | None,
    transform_specs: Sequence[str],
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The training samples a client view holds, as (x, y, domain): labels through each
    sample's label map (real drift), images through each sample's transform (virtual
    drift), drawn with ``seed`` (noise). A label map never touches an image, and a
    transform never a label."""
    x, y = dataset.x_train[view.indices], dataset.y_train[view.indices]
    domain = None if dataset.domain_train is None else dataset.domain_train[view.indices]
    if view.concepts is not None and label_maps is not None:
        y = label_maps[view.concepts, y]
    if view.transforms is not None:
        for transform in np.unique(view.transforms):
            spec = transform_specs[int(transform)]
            if spec == "identity":
                continue
            members = np.flatnonzero(view.transforms == transform)
            changed = parse_transform(spec)(x[members], seed=seed + int(transform))
            if changed.shape[1:] != x.shape[1:]:
                raise ValueError(f"transform {spec!r} changes the image shape; drift streams keep it")
            x[members] = changed  # x is a copy: fancy indexing above
    return x, y, domain
