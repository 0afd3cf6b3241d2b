"""The identity autoencoder of pixel-space models: the "latents" are the images themselves."""

from __future__ import annotations

import torch
from torch import Tensor


class IdentityAutoencoder:
    """Fulfils :class:`t2i_engine.interfaces.Autoencoder` for pixel-space diffusion (Imagen, IF):
    images in [-1, 1] are the denoiser's space, unscaled (factor 1, 3 channels)."""

    latent_channels = 3
    downsample_factor = 1
    scaling_factor = 1.0

    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Images ``(B, 3, H, W)`` unchanged (there is no posterior to sample)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"pixel-space model: images must be (B, 3, H, W), got {tuple(images.shape)}")
        return images

    def decode(self, latents: Tensor) -> Tensor:
        """``latents`` unchanged: they are images."""
        return latents
