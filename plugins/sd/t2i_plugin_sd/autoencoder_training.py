"""Training the KL autoencoder (Rombach et al. 2022, section 3 and appendix G) with the core loop.

:class:`AutoencoderTrainable` wraps an :class:`~t2i_plugin_sd.autoencoder.AutoencoderKL` as a
:class:`~t2i_engine.training.protocol.TrainableModel`: the loss is the L1 reconstruction error
of a posterior sample plus a small KL term towards N(0, I) that keeps the latent space smooth
and bounded. (The adversarial and perceptual terms of the paper are left out: flat procedural
images do not need them.) :func:`latent_scaling_factor` gives the factor that makes the scaled
latents unit-variance, as the SD 1 factor 0.18215 did for its autoencoder.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from t2i_plugin_sd.autoencoder import AutoencoderKL

__all__ = ["AutoencoderTrainable", "kl_divergence", "latent_scaling_factor"]


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


class AutoencoderTrainable(nn.Module):
    """An autoencoder for the Fabric loop; batches hold ``"image"`` ``(B, 3, H, W)`` in [-1, 1]."""

    def __init__(self, vae: AutoencoderKL, *, kl_weight: float = 1e-3, logvar_init: float | None = -6.0) -> None:
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight  # weight of the KL term against the L1 term (both means)
        if logvar_init is not None:
            # A fresh encoder's posterior has variance ~1, far above its means, so the decoder
            # first sees mostly noise and learns the mean image; starting the log-variance low
            # lets the signal through from step one (the small KL term still bounds it).
            with torch.no_grad():
                vae.quant_conv.bias[vae.latent_channels:].fill_(logvar_init)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Every autoencoder parameter."""
        yield from self.vae.parameters()

    def training_loss(self, batch: Mapping[str, Any], *, generator: torch.Generator | None) -> Tensor:
        """L1 reconstruction of a posterior sample + ``kl_weight`` * KL."""
        return self(batch, generator=generator)

    def forward(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> Tensor:
        images = batch["image"]  # (B, 3, H, W)
        mean, logvar = self.vae.moments(images)  # (B, C, H/f, W/f) each
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise
        recon = self.vae.decoder(self.vae.post_quant_conv(z))  # (B, 3, H, W)
        return (recon - images).abs().mean() + self.kl_weight * kl_divergence(mean, logvar)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, batches: Iterable[Tensor]) -> float:
    """``1 / std`` of the unscaled posterior means over ``batches`` of images in [-1, 1]."""
    means = [vae.moments(images)[0].flatten() for images in batches]
    return float(1.0 / torch.cat(means).std().clamp_min(1e-6))
