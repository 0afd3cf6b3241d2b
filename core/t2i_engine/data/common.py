"""Helpers the file-backed datasets share: decoding, per-sample generators, transform config."""

from __future__ import annotations

import io
import zlib
from typing import Literal

import attrs
import torch
from attrs.validators import ge, in_
from torch import Tensor

from t2i_engine.config.fields import option
from t2i_engine.config.limits import image_side, seed_value
from t2i_engine.data.transforms import PairedTransform

__all__ = ["IMAGE_EXTENSIONS", "TransformOptions", "decode_image", "sample_generator"]

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")


def decode_image(data: bytes) -> Tensor:
    """Encoded image bytes -> ``(3, H, W)`` float in [-1, 1]; raises on undecodable data."""
    from PIL import Image

    from t2i_engine.utils.images import from_pil

    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode fully here, so truncated files fail now
        return from_pil(img)


def sample_generator(seed: int, key: str) -> torch.Generator:
    """A generator that depends only on ``(seed, key)``: the same crop in every worker and run."""
    # modulo 2**64: large seeds wrap instead of overflowing manual_seed (small ones are unchanged)
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**64)


@attrs.frozen(kw_only=True)
class TransformOptions:
    """Transform keys shared by the image datasets (mixed into their Config)."""

    resolution: int = option(default=256, validator=image_side, help="square output size in pixels")
    crop: Literal["center", "random"] = option(default="center", validator=in_(("center", "random")),
                                               help="center or random crop")
    hflip: bool = option(default=False, help="random horizontal flip")
    seed: int = option(default=0, validator=seed_value,
                       help="seed of the random crops and flips (fixed per sample)")

    def transform(self) -> PairedTransform:
        """The :class:`PairedTransform` these options describe."""
        return PairedTransform(resolution=self.resolution, crop=self.crop, hflip=self.hflip)
