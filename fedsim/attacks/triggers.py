"""Backdoor triggers: what an attacker stamps on an image, the same at training and test time.

A :class:`Trigger` is a frozen description; :meth:`Trigger.apply` returns a triggered copy
of a batch (numpy or torch, shaped (N, C, H, W) or one image (C, H, W)) and never changes
its input. Three kinds:

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

DBA (Xie et al., ICLR 2020) cuts a patch among colluding clients: :meth:`Trigger.split`
returns ``k`` sub-triggers whose pixels are disjoint and together are the full patch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
KINDS = ("patch", "blend", "learnable")


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger (see the module's docstring for the kinds and their options).

    ``part = (i, k)`` restricts a patch to the i-th of k row-major chunks of its pixels
    (what :meth:`split` makes); ``(0, 1)`` is the whole patch.
    """

    kind: Literal["patch", "blend", "learnable"] = "patch"
    size: int = 3
    location: str | tuple[int, int] = "bottom-right"
    value: float = 1.0
    alpha: float | None = None  # blend 0.2, learnable 0.3 (Mirage) when not given
    seed: int = 0
    pattern: Any = field(default=None, compare=False, hash=False, repr=False)  # (C, H, W) or broadcastable
    init: float = 0.5
    part: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"trigger kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind == "patch":
            if int(self.size) < 1:
                raise ValueError(f"a patch trigger's size must be >= 1, got {self.size!r}")
            if isinstance(self.location, str) and self.location not in CORNERS:
                raise ValueError(
                    f"a patch trigger's location must be one of {', '.join(CORNERS)} or (row, col); "
                    f"got {self.location!r}"
                )
            if not isinstance(self.location, str):
                if len(self.location) != 2:
                    raise ValueError(f"a patch trigger's location (row, col) needs two numbers, got {self.location!r}")
                object.__setattr__(self, "location", (int(self.location[0]), int(self.location[1])))
        elif self.alpha is None:
            object.__setattr__(self, "alpha", 0.2 if self.kind == "blend" else 0.3)
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"a blend trigger's alpha must be in [0, 1], got {self.alpha!r}")
        index, parts = self.part
        if not (parts >= 1 and 0 <= index < parts):
            raise ValueError(f"a trigger's part (i, k) needs 0 <= i < k, got {self.part!r}")
        if parts > 1 and self.kind != "patch":
            raise ValueError("only a patch trigger is split into parts")

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

    def mask(self, height: int, width: int) -> np.ndarray:
        """Boolean (H, W) mask of the pixels this trigger sets (a patch; the whole image
        for a blend)."""
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
        """DBA's k local triggers: the patch's pixels in row-major order, cut into k
        chunks as equal as possible (the first ones one pixel larger when they do not
        divide); disjoint, and together the full patch."""
        if self.kind != "patch":
            raise ValueError("DBA splits a patch trigger; this one is a " + repr(self.kind))
        if self.part != (0, 1):
            raise ValueError("this trigger is already a part of a split")
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
        if self.kind == "patch":
            raise ValueError("a patch trigger has no pattern")
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
            if self.kind == "patch":
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
        if self.kind == "patch":
            out = x.copy()
            out[..., self.mask(shape[1], shape[2])] = self.value
            return out
        alpha = np.float32(self.alpha) if x.dtype == np.float32 else float(self.alpha)
        t = self.blend_pattern(shape).astype(x.dtype, copy=False)
        return ((1 - alpha) * x + alpha * t).astype(x.dtype, copy=False)
