"""The residual shapes a conditioner must give the core UNet (ControlNet, T2I-style adapters)."""

from __future__ import annotations

from typing import Any

__all__ = ["unet_residual_shapes"]


def unet_residual_shapes(unet: Any, height: int, width: int) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """``(down, mid)``: the ``(C, h, w)`` of each skip connection of the core UNet
    (:class:`t2i_engine.nn.unet.UNet`, by its ``config``) for latents of ``height x width``, in the
    order :class:`~t2i_engine.interfaces.Residuals` ``down`` lists them, and of its middle block.

    The encoder's skips are ``conv_in``'s output, then per level ``layers_per_block`` block outputs
    and (but on the last level) the stride-2 downsampler's (``ceil(h / 2)``: it pads by one).
    """
    cfg = getattr(unet, "config", None)
    channels, layers = getattr(cfg, "channels", None), getattr(cfg, "layers_per_block", None)
    if channels is None or layers is None:
        raise TypeError(f"{type(unet).__name__} is not the core UNet (no config.channels / layers_per_block)")
    h, w = height, width
    down = [(channels[0], h, w)]
    for level, ch in enumerate(channels):
        down += [(ch, h, w)] * layers
        if level < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            down.append((ch, h, w))
    return down, (channels[-1], h, w)
