"""Paired image transforms: resize the shortest side, centre or random crop, horizontal flip.

The random parameters are drawn once per sample (:meth:`PairedTransform.sample_params`) and
applied to every image of the sample (an image and its hint, a source and its edit), so the
pair stays pixel-aligned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CropParams", "PairedTransform"]


@attrs.frozen
class CropParams:
    """Where to cut: the size after resizing, the crop's top-left corner, and the flip."""

    resized: tuple[int, int]  # (H, W) after resizing the shortest side to the resolution
    top: int
    left: int
    flip: bool


@attrs.frozen(kw_only=True)
class PairedTransform:
    """Resize so the shortest side is ``resolution``, crop ``resolution`` square, maybe flip."""

    resolution: int
    crop: Literal["center", "random"] = "center"
    hflip: bool = False  # flip with probability 1/2

    def sample_params(self, height: int, width: int, *, generator: torch.Generator | None) -> CropParams:
        """Draw the crop and flip for an image of ``height x width``."""
        scale = self.resolution / min(height, width)
        rh = self.resolution if height <= width else max(self.resolution, round(height * scale))
        rw = self.resolution if width <= height else max(self.resolution, round(width * scale))
        if self.crop == "random":
            top = int(torch.randint(0, rh - self.resolution + 1, (), generator=generator))
            left = int(torch.randint(0, rw - self.resolution + 1, (), generator=generator))
        else:
            top, left = (rh - self.resolution) // 2, (rw - self.resolution) // 2
        flip = bool(self.hflip and torch.rand((), generator=generator) < 0.5)
        return CropParams((rh, rw), top, left, flip)

    def apply(self, image: Tensor, params: CropParams) -> Tensor:
        """Resize, crop and flip ``image`` ``(C, H, W)`` with ``params``."""
        if tuple(image.shape[-2:]) != params.resized:
            image = F.interpolate(image[None].float(), size=params.resized, mode="bilinear",
                                  antialias=True, align_corners=False)[0]
        r = self.resolution
        image = image[:, params.top:params.top + r, params.left:params.left + r]  # (C, r, r)
        return image.flip(-1) if params.flip else image

    def __call__(self, images: Mapping[str, Tensor], *,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Transform every image of one sample with the same parameters; sizes must agree."""
        sizes = {tuple(v.shape[-2:]) for v in images.values()}
        if len(sizes) != 1:
            raise ValueError(f"paired images have different sizes: "
                             f"{ {k: tuple(v.shape[-2:]) for k, v in images.items()} }")
        h, w = sizes.pop()
        params = self.sample_params(h, w, generator=generator)
        return {k: self.apply(v, params) for k, v in images.items()}
