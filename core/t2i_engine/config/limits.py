"""Bounds on seeds, image sizes and memory, shared by every table that takes them.

A value outside these bounds is a :class:`~t2i_engine.errors.ConfigError` naming the key and
the allowed range, raised while the config is validated (or, for memory, before the task
allocates anything), never an overflow or an allocation failure deep inside PyTorch.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from t2i_engine.errors import ConfigError

__all__ = ["INT64_MAX", "INT64_MIN", "MAX_IMAGE_SIDE", "SEED_MAX", "available_memory", "image_side",
           "require_image_memory", "require_memory", "seed_value",
           "seeds_value"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""TOML's integer range (tomllib itself accepts any size)."""

SEED_MAX = 2**63 - 1
"""Largest seed: per-image seeds are ``seed + index`` and must stay within torch's 64 bits."""

MAX_IMAGE_SIDE = 16384
"""Largest image width or height in pixels (SD-class autoencoders decode far less)."""


def _seed_in_range(_inst: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and not 0 <= value <= SEED_MAX:
        raise ValueError(f"'{attribute.name}' must be between 0 and 2**63-1 ({SEED_MAX}): {value}")


def _seeds_in_range(_inst: Any, attribute: attrs.Attribute, value: list[int] | None) -> None:
    for i, seed in enumerate(value or ()):
        if not 0 <= seed <= SEED_MAX:
            raise ValueError(f"'{attribute.name}' must hold seeds between 0 and 2**63-1 ({SEED_MAX}): "
                             f"item {i} is {seed}")


def _side_in_range(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if not 8 <= value <= MAX_IMAGE_SIDE:
        raise ValueError(f"'{attribute.name}' must be between 8 and {MAX_IMAGE_SIDE} pixels: {value}")


seed_value = _seed_in_range
"""attrs validator: a seed in ``[0, SEED_MAX]`` (or None)."""

seeds_value = _seeds_in_range
"""attrs validator: a list of seeds, each in ``[0, SEED_MAX]`` (or None)."""

image_side = _side_in_range
"""attrs validator: an image width, height or side in ``[8, MAX_IMAGE_SIDE]``."""


def available_memory(device: torch.device) -> int | None:
    """Bytes the process could still allocate on ``device``: free CUDA memory, or the system's
    ``MemAvailable`` on the CPU; None when it cannot be told."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no driver information: do not guess
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def require_memory(key: str, nbytes: int, device: torch.device, *, what: str) -> None:
    """Raise ConfigError naming ``key`` when ``nbytes`` (a lower bound of what ``what`` needs)
    is more than ``device`` has free; checked before the task allocates."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise ConfigError(f"{key}: {what} needs at least {nbytes / 2**30:.1f} GiB, but only "
                          f"{free / 2**30:.1f} GiB is free on {device}; make it smaller")


def require_image_memory(key: str, *, width: int, height: int, batch: int, device: torch.device) -> None:
    """Refuse (ConfigError naming ``key``) a batch of images whose float32 pixels alone do not fit
    in the free memory of ``device``: the decoded batch is the one tensor every model allocates,
    so this is a lower bound, checked before sampling starts."""
    require_memory(key, batch * 3 * width * height * 4, device,
                   what=f"a batch of {batch} images of {width}x{height} (float32 pixels)")
