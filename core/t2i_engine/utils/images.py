"""Image helpers shared by tasks: tensors <-> PIL, grids, PNGs with text metadata."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import fsspec
import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, C)`` uint8 (rounded, clamped)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_pil(image: Image.Image) -> Tensor:
    """A PIL image -> ``(3, H, W)`` float tensor in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def to_pil(images: Tensor) -> list[Image.Image]:
    """``(B, C, H, W)`` in [-1, 1] -> PIL images."""
    return [Image.fromarray(a if a.shape[-1] != 1 else a[..., 0]) for a in to_uint8(images)]


def make_grid(images: Tensor | Sequence[Tensor], *, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """Tile ``(B, C, H, W)`` images in [-1, 1] into one PIL image, ``nrow`` per row."""
    if not isinstance(images, Tensor):
        images = torch.stack(list(images))
    b, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    tiles = to_uint8(images)
    canvas = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, tiles.shape[-1]),
                     255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        canvas[y:y + h, x:x + w] = tile
    return Image.fromarray(canvas if canvas.shape[-1] != 1 else canvas[..., 0])


def save_png(image: Image.Image, url: str, *, metadata: Mapping[str, str] | None = None) -> str:
    """Write ``image`` as PNG to a path or fsspec URL, with ``metadata`` as tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    with fsspec.open(url, "wb") as f:
        f.write(buffer.getvalue())
    return url
