"""Loading the images a job names for its conditioners (path or fsspec URL)."""

from __future__ import annotations

import torch

from t2i_engine.errors import ConfigError

__all__ = ["load_image", "load_input", "load_tensor"]


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


def load_tensor(url: str, *, key: str = "tensor") -> torch.Tensor:
    """The one tensor of a ``.safetensors`` file (path or fsspec URL); anything else is a
    ConfigError naming ``key``."""
    from safetensors.torch import load as load_safetensors

    from t2i_engine.checkpoint.io import read_bytes

    try:
        tensors = load_safetensors(read_bytes(url))
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt file: name the key
        raise ConfigError(f"{key}: '{url}' is not a readable safetensors file ({type(exc).__name__})") from exc
    if len(tensors) != 1:
        raise ConfigError(f"{key}: '{url}' holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); "
                          "give a file with exactly one")
    return next(iter(tensors.values()))


def load_input(url: str, *, width: int, height: int, key: str) -> torch.Tensor:
    """A conditioner input: a ``.safetensors`` file's one tensor as stored (batch-first, a first
    dimension of 1 is expanded to the batch), else an image ``(1, 3, height, width)`` in [-1, 1]."""
    if url.split("?")[0].endswith(".safetensors"):
        return load_tensor(url, key=key)
    return load_image(url, width=width, height=height, key=key)
