"""Loading the images a job names for its conditioners (path or fsspec URL)."""

from __future__ import annotations

import torch

from t2i_engine.errors import ConfigError

__all__ = ["load_image"]


def load_image(url: str, *, width: int, height: int, key: str = "image") -> torch.Tensor:
    """``(1, 3, height, width)`` in [-1, 1] from an image file or fsspec URL (bicubic resize);
    an unreadable file is a ConfigError naming ``key``."""
    import fsspec
    from PIL import Image

    from t2i_engine.utils.images import from_pil

    try:
        with fsspec.open(url, "rb") as f:
            img = Image.open(f).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise ConfigError(f"{key}: '{url}' is not a readable image ({type(exc).__name__})") from exc
    return from_pil(img)[None]
