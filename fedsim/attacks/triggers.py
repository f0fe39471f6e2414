"""Backdoor triggers: what an attacker stamps on an image, the same at training and test time.

A :class:`Trigger` is a frozen description; :meth:`Trigger.apply` returns a triggered copy
of a batch (numpy or torch, shaped (N, C, H, W) or one image (C, H, W)) and never changes
its input. Four kinds:

- ``"patch"`` (BadNets, Gu et al. 2017): a ``size`` x ``size`` square set to ``value`` on
  every channel, at a corner (``"top-left"``, ``"top-right"``, ``"bottom-left"``,
  ``"bottom-right"``) or at an explicit ``(row, col)`` of its top-left pixel.
- ``"blend"`` (Chen et al. 2017): ``x' = (1 - alpha) x + alpha t`` over the whole image,
  ``t`` a fixed pattern: the given ``pattern``, else uniform [0, 1) noise drawn from ``seed``
  (the same pattern for the same seed and image shape, wherever it is drawn).
- ``"learnable"`` (Mirage): a blend whose pattern the attack updates; it starts as
  ``init`` (0.5) everywhere, with ``alpha`` 0.3. :meth:`Trigger.with_pattern` gives the
  trigger with an updated pattern; :meth:`Trigger.apply` takes a torch ``pattern`` to stay
  differentiable in it.
- ``"bars"`` (DBA, Xie et al., ICLR 2020): ``bars`` separated bars, the local triggers of
  colluding clients, set to ``value`` on every channel; see below.

DBA's local triggers are disjoint and together are the global trigger the attack is tested
with: :meth:`Trigger.split` returns them (one bar each of a ``bars`` trigger, or row-major
chunks of a patch, a layout of fedsim's own).

**DBA's bars.** The reference code (AI-secure/DBA, ``utils/*_params.yaml``) lists each
adversary's pixels, ``N_poison_pattern``, for 4 adversaries: bars of ``bar = (height,
width)`` pixels, ``gap`` pixels apart, on a grid of two columns from the image's top-left
pixel: bar i's top-left pixel is at row ``(i // 2) * (height + gap)``, column ``(i % 2) *
(width + gap)``. The bar and the gap depend on the dataset, so here on the image's size
(its smaller side, :func:`reference_bar`):

- 28 (MNIST, ``mnist_params.yaml``): 1 x 4 bars, gap 2 (bars at (0, 0), (0, 6), (3, 0), (3, 6));
- 32 (CIFAR-10, ``cifar_params.yaml``): 1 x 6 bars, gap 3 ((0, 0), (0, 9), (4, 0), (4, 9));
- 64 (Tiny-ImageNet, ``tiny_params.yaml``): 2 x 10 bars, gap 2 ((0, 0), (0, 12), (4, 0), (4, 12)).

Sizes the yamls do not cover take the bars of the largest covered size not above them (29
to 31: MNIST's; 33 to 63: CIFAR's; above 64: Tiny-ImageNet's); images smaller than 28
take MNIST's shrunk in proportion (width ``max(1, 4 * side // 28)``, gap ``max(1, 2 * side
// 28)``, height 1: 1 x 1 bars 1 apart on 8 x 8 digits). More than the yamls' 4 bars
continue the grid downwards (bars 4 and 5 on a third row, ...), as long as they fit the
image; a trigger that does not fit is refused with the fix. ``bar`` and ``gap`` given
explicitly replace the rule, and ``location`` moves the grid (a corner, or the (row, col)
of its top-left pixel; the yamls' is the top-left corner, the default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fedsim.checks import check, check_choice, check_integer, check_number

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
KINDS = ("patch", "blend", "learnable", "bars")

# DBA's bars per image size, from the reference's yamls (AI-secure/DBA): side -> (bar (height,
# width), gap). The LOAN yaml's triggers are feature values of tabular data, not pixels.
REFERENCE_BARS = {
    28: ((1, 4), 2),  # mnist_params.yaml
    32: ((1, 6), 3),  # cifar_params.yaml
    64: ((2, 10), 2),  # tiny_params.yaml
}


def reference_size(height: int, width: int) -> int:
    """The image size of the reference's yamls whose settings an image of this size takes:
    the largest of 28, 32 and 64 not above its smaller side (28 below 28)."""
    side = min(int(height), int(width))
    return max([size for size in REFERENCE_BARS if size <= side], default=min(REFERENCE_BARS))


def reference_bar(height: int, width: int) -> tuple[tuple[int, int], int]:
    """DBA's bar (height, width) and gap for an image of this size (the module's rule)."""
    side = min(int(height), int(width))
    size = reference_size(height, width)
    if side >= size:
        return REFERENCE_BARS[size]
    # smaller than MNIST: its bars shrunk in proportion, so that 8 x 8 images get bars too
    (bar_height, bar_width), gap = REFERENCE_BARS[size]
    return (bar_height, max(1, bar_width * side // size)), max(1, gap * side // size)


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger (see the module's docstring for the kinds and their options).

    ``part = (i, k)`` restricts a patch to the i-th of k row-major chunks of its pixels,
    and a ``bars`` trigger (k = ``bars``) to its bar i (what :meth:`split` makes); ``(0,
    1)`` is the whole trigger. ``location`` defaults to the bottom-right corner, and to the
    top-left one (the reference's) for bars.
    """

    kind: Literal["patch", "blend", "learnable", "bars"] = "patch"
    size: int = 3
    location: str | tuple[int, int] | None = None
    value: float = 1.0
    alpha: float | None = None  # blend 0.2, learnable 0.3 (Mirage) when not given
    seed: int = 0
    pattern: Any = field(default=None, compare=False, hash=False, repr=False)  # (C, H, W) or broadcastable
    init: float = 0.5
    part: tuple[int, int] = (0, 1)
    bars: int = 4  # how many bars a bars trigger has (the reference's trigger_num)
    bar: tuple[int, int] | None = None  # a bar's (height, width); None: by image size
    gap: int | None = None  # pixels between bars; None: by image size

    def __post_init__(self) -> None:
        check_choice("trigger kind", self.kind, KINDS)
        if self.location is None:
            object.__setattr__(self, "location", "top-left" if self.kind == "bars" else "bottom-right")
        if self.kind in ("patch", "bars"):
            if self.kind == "patch":
                check_integer("a patch trigger's size", self.size, minimum=1)
            if isinstance(self.location, str):
                check(
                    self.location in CORNERS,
                    f"a {self.kind} trigger's location must be one of {', '.join(CORNERS)} or (row, col); "
                    f"got {self.location!r}",
                )
            else:
                check(
                    len(self.location) == 2,
                    f"a {self.kind} trigger's location (row, col) needs two numbers, got {self.location!r}",
                )
                object.__setattr__(self, "location", (int(self.location[0]), int(self.location[1])))
        elif self.alpha is None:
            object.__setattr__(self, "alpha", 0.2 if self.kind == "blend" else 0.3)
        if self.alpha is not None:
            check_number(f"a {self.kind} trigger's alpha", self.alpha, at_least=0, at_most=1)
        index, parts = self.part
        check(parts >= 1 and 0 <= index < parts, f"a trigger's part (i, k) needs 0 <= i < k, got {self.part!r}")
        check(parts == 1 or self.kind in ("patch", "bars"), "only a patch or bars trigger is split into parts")
        self._check_bars()

    def _check_bars(self) -> None:
        if self.kind != "bars":
            check(
                self.bar is None and self.gap is None,
                f"bar and gap shape a bars trigger; this one is a {self.kind!r} trigger",
            )
            return
        check_integer("a bars trigger's bars", self.bars, minimum=1)
        if self.bar is not None:
            check(
                len(self.bar) == 2 and min(int(n) for n in self.bar) >= 1,
                f"a bar is (height, width), both >= 1; got {self.bar!r}",
            )
            object.__setattr__(self, "bar", (int(self.bar[0]), int(self.bar[1])))
        if self.gap is not None:
            check_integer("the gap between bars", self.gap, minimum=0)
        check(
            self.part[1] in (1, int(self.bars)),
            f"a trigger of {self.bars} bars has parts (i, {self.bars}), got {self.part!r}",
        )

    # -- where a patch lands ------------------------------------------------------------
    def origin(self, height: int, width: int) -> tuple[int, int]:
        """The (row, col) of the patch's top-left pixel in an image of that size."""
        size = int(self.size)
        if size > height or size > width:
            raise ValueError(f"a {size}x{size} patch does not fit a {height}x{width} image")
        if isinstance(self.location, str):
            row = 0 if self.location.startswith("top") else height - size
            col = 0 if self.location.endswith("left") else width - size
            return row, col
        row, col = self.location
        if not (0 <= row <= height - size and 0 <= col <= width - size):
            raise ValueError(f"a {size}x{size} patch at {self.location} does not fit a {height}x{width} image")
        return row, col

    def bar_geometry(self, height: int, width: int) -> tuple[tuple[int, int], int]:
        """A bars trigger's bar (height, width) and gap on an image of this size: the given
        ones, else the reference's for the size (the module's rule)."""
        bar, gap = reference_bar(height, width)
        return (self.bar or bar), (gap if self.gap is None else int(self.gap))

    def bar_origins(self, height: int, width: int) -> list[tuple[int, int]]:
        """The (row, col) of each bar's top-left pixel, bar 0 first (all ``bars`` of them)."""
        (bar_height, bar_width), gap = self.bar_geometry(height, width)
        count = int(self.bars)
        rows, cols = -(-count // 2), min(count, 2)
        box = (rows * bar_height + (rows - 1) * gap, cols * bar_width + (cols - 1) * gap)
        if isinstance(self.location, str):
            top = 0 if self.location.startswith("top") else height - box[0]
            left = 0 if self.location.endswith("left") else width - box[1]
        else:
            top, left = self.location
        if not (0 <= top <= height - box[0] and 0 <= left <= width - box[1]):
            raise ValueError(
                f"{count} bars of {bar_height}x{bar_width} pixels, {gap} apart, take {box[0]}x{box[1]} pixels at "
                f"{self.location} and do not fit a {height}x{width} image; give a smaller bar or gap, fewer bars, "
                "or a patch trigger"
            )
        return [(top + (i // 2) * (bar_height + gap), left + (i % 2) * (bar_width + gap)) for i in range(count)]

    def mask(self, height: int, width: int) -> np.ndarray:
        """Boolean (H, W) mask of the pixels this trigger sets (a patch or bars; the whole
        image for a blend)."""
        if self.kind == "bars":
            (bar_height, bar_width), _ = self.bar_geometry(height, width)
            origins = self.bar_origins(height, width)
            if self.part[1] > 1:
                origins = [origins[self.part[0]]]
            mask = np.zeros((height, width), dtype=bool)
            for row, col in origins:
                mask[row : row + bar_height, col : col + bar_width] = True
            return mask
        if self.kind != "patch":
            return np.ones((height, width), dtype=bool)
        row, col = self.origin(height, width)
        size = int(self.size)
        cells = np.arange(size * size)
        index, parts = self.part
        chosen = np.array_split(cells, parts)[index]
        mask = np.zeros((height, width), dtype=bool)
        mask[row + chosen // size, col + chosen % size] = True
        return mask

    def split(self, k: int) -> list[Trigger]:
        """DBA's k local triggers, disjoint and together this trigger: a bars trigger's
        bars (k = ``bars``), or a patch's pixels in row-major order cut into k chunks as
        equal as possible (the first ones one pixel larger when they do not divide)."""
        if self.kind not in ("patch", "bars"):
            raise ValueError("DBA splits a patch or bars trigger; this one is a " + repr(self.kind))
        if self.part != (0, 1):
            raise ValueError("this trigger is already a part of a split")
        if self.kind == "bars":
            if k != int(self.bars):
                raise ValueError(f"a trigger of {self.bars} bars splits into its {self.bars} bars, not {k} parts")
            return [dataclasses.replace(self, part=(i, k)) for i in range(k)]
        if not 1 <= k <= int(self.size) ** 2:
            raise ValueError(f"cannot split a {self.size}x{self.size} patch into {k} parts")
        return [dataclasses.replace(self, part=(i, k)) for i in range(k)]

    # -- blend patterns -------------------------------------------------------------------
    def blend_pattern(self, shape: tuple[int, ...]) -> np.ndarray:
        """The blend pattern for images of ``shape`` (C, H, W), as float32."""
        if self.pattern is not None:
            pattern = self.pattern.detach().cpu().numpy() if isinstance(self.pattern, torch.Tensor) else self.pattern
            return np.array(np.broadcast_to(np.asarray(pattern, dtype=np.float32), shape))
        if self.kind == "learnable":
            return np.full(shape, self.init, dtype=np.float32)
        generator = torch.Generator().manual_seed(int(self.seed))
        return torch.rand(tuple(shape), generator=generator).numpy()

    def with_pattern(self, pattern: np.ndarray | torch.Tensor) -> Trigger:
        """This trigger with another blend pattern (a learnable trigger's update)."""
        if self.kind in ("patch", "bars"):
            raise ValueError(f"a {self.kind} trigger has no pattern")
        if isinstance(pattern, torch.Tensor):
            pattern = pattern.detach().cpu().numpy()
        return dataclasses.replace(self, pattern=np.array(pattern, dtype=np.float32))

    # -- applying it --------------------------------------------------------------------
    def apply(self, x: np.ndarray | torch.Tensor, pattern: torch.Tensor | None = None) -> np.ndarray | torch.Tensor:
        """A triggered copy of ``x`` (a batch (N, C, H, W) or one image (C, H, W)), of the
        same type, dtype and device. ``pattern`` (torch) overrides a blend's pattern and
        keeps the result differentiable in it."""
        if x.ndim < 3:
            raise ValueError(f"triggers apply to images (C, H, W) or batches of them; got shape {tuple(x.shape)}")
        shape = tuple(x.shape[-3:])
        if isinstance(x, torch.Tensor):
            if self.kind in ("patch", "bars"):
                out = x.clone()
                mask = torch.as_tensor(self.mask(shape[1], shape[2]), device=x.device)
                out[..., mask] = torch.as_tensor(self.value, dtype=x.dtype, device=x.device)
                return out
            t = pattern if pattern is not None else torch.as_tensor(self.blend_pattern(shape))
            t = t.to(device=x.device, dtype=x.dtype)
            alpha = float(self.alpha)
            return (1 - alpha) * x + alpha * t
        x = np.asarray(x)
        if pattern is not None:
            raise ValueError("a torch pattern needs a torch batch")
        if self.kind in ("patch", "bars"):
            out = x.copy()
            out[..., self.mask(shape[1], shape[2])] = self.value
            return out
        alpha = np.float32(self.alpha) if x.dtype == np.float32 else float(self.alpha)
        t = self.blend_pattern(shape).astype(x.dtype, copy=False)
        return ((1 - alpha) * x + alpha * t).astype(x.dtype, copy=False)
