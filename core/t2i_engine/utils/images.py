"""Image helpers shared by tasks: tensors <-> PIL, grids, PNGs with text metadata."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from torch import Tensor

from t2i_engine.checkpoint.io import atomic_write_bytes


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


def wrap_text(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide in ``font``
    (a word wider than a line is cut between characters)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:  # the word alone may still be too wide: cut it
            if line and font.getlength(line + ch) > width:
                lines.append(line)
                line = ""
            line += ch
    return lines + [line] if line else lines


def _caption_lines(captions: Sequence[str], font: Any, width: int, max_lines: int) -> list[list[str]]:
    out = []
    for caption in captions:
        lines = wrap_text(caption, font, width)
        if len(lines) > max_lines:  # keep the band short; the PNG's metadata has the full prompt
            lines = lines[:max_lines - 1] + [lines[max_lines - 1].rstrip() + "..."]
        out.append(lines)
    return out


def make_grid(images: Tensor | Sequence[Tensor], *, nrow: int | None = None, padding: int = 2,
              captions: Sequence[str] | None = None, max_caption_lines: int = 4) -> Image.Image:
    """Tile ``(B, C, H, W)`` images in [-1, 1] into one PIL image, ``nrow`` per row.

    With ``captions`` (one str per image), each tile gets its caption written under it in PIL's
    built-in default font (nothing is downloaded), word-wrapped to the tile's width and cut to
    ``max_caption_lines`` lines.
    """
    if not isinstance(images, Tensor):
        images = torch.stack(list(images))
    b, _, h, w = images.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"make_grid: {len(captions)} captions for {b} images")
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    tiles = to_uint8(images)
    font = ImageFont.load_default() if captions is not None else None
    wrapped = _caption_lines(captions, font, w, max_caption_lines) if captions is not None else []
    line_h = font.getbbox("Ag")[3] + 1 if font is not None else 0
    band = max(len(lines) for lines in wrapped) * line_h + padding if wrapped else 0  # caption rows under tiles
    cell_h = h + band
    canvas = np.full((rows * (cell_h + padding) + padding, nrow * (w + padding) + padding, tiles.shape[-1]),
                     255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        y, x = padding + r * (cell_h + padding), padding + c * (w + padding)
        canvas[y:y + h, x:x + w] = tile
    grid = Image.fromarray(canvas if canvas.shape[-1] != 1 else canvas[..., 0])
    if wrapped:
        draw = ImageDraw.Draw(grid)
        ink = 0 if grid.mode == "L" else (0, 0, 0)
        for i, lines in enumerate(wrapped):
            r, c = divmod(i, nrow)
            y, x = padding + r * (cell_h + padding) + h + padding // 2, padding + c * (w + padding)
            for k, line in enumerate(lines):
                draw.text((x, y + k * line_h), line, fill=ink, font=font)
    return grid


def png_bytes(image: Image.Image, *, metadata: Mapping[str, str] | None = None) -> bytes:
    """``image`` encoded as PNG, with ``metadata`` as tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, url: str, *, metadata: Mapping[str, str] | None = None) -> str:
    """Write ``image`` as PNG to a path or fsspec URL, with ``metadata`` as tEXt chunks.

    The write is atomic (:func:`t2i_engine.checkpoint.io.atomic_write_bytes`): a killed or failed
    write never leaves a truncated PNG under ``url``, so a resumed job can trust every file it finds.
    """
    atomic_write_bytes(url, png_bytes(image, metadata=metadata))
    return url
