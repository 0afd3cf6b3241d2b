"""A tiny random model bundle built from the core's own parts, for plugin tests.

:func:`tiny_model` gives a :class:`~t2i_engine.interfaces.LatentDiffusionModel`-shaped bundle:
the core UNet (two levels, 4 latent channels), a hashing text encoder, an average-pooling
"autoencoder" with factor 8 (so hint images are 8x the latent size, as ControlNet expects) and a
scaled-linear DDPM schedule. Nothing is downloaded and nothing is trained: it checks wiring and
behaviour, not image quality.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.diffusion.schedules import DiscreteSchedule
from t2i_engine.interfaces import TextEmbedding
from t2i_engine.nn.unet import UNet, UNetConfig

__all__ = ["ToyAutoencoder", "ToyModel", "ToyTextEncoder", "tiny_model"]


class ToyTextEncoder(nn.Module):
    """Each prompt -> ``max_length`` tokens drawn from a generator seeded by the prompt's hash."""

    def __init__(self, *, dim: int = 16, max_length: int = 4) -> None:
        super().__init__()
        self.dim, self.max_length = dim, max_length

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        rows = []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
            rows.append(torch.randn(self.max_length, self.dim, generator=torch.Generator().manual_seed(seed)))
        return TextEmbedding(torch.stack(rows))  # (B, L, D)


class ToyAutoencoder(nn.Module):
    """Images -> 8x average-pooled latents (RGB plus their mean as a 4th channel) and back."""

    latent_channels = 4
    downsample_factor = 8
    scaling_factor = 1.0

    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        small = F.avg_pool2d(images, self.downsample_factor)  # (B, 3, H/8, W/8)
        return torch.cat([small, small.mean(dim=1, keepdim=True)], dim=1)

    def decode(self, latents: Tensor) -> Tensor:
        return F.interpolate(latents[:, :3], scale_factor=self.downsample_factor, mode="nearest")


class ToyModel(nn.Module):
    """The bundle: ``text_encoder``, ``autoencoder``, ``denoiser`` (the core UNet), ``schedule``."""

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.text_encoder = ToyTextEncoder()
        self.autoencoder = ToyAutoencoder()
        self.denoiser = UNet(UNetConfig(channels=(16, 32), attention=(False, True), heads=(2, 2), layers_per_block=1,
                                        context_dim=16, groups=8)).eval()
        self.schedule = DiscreteSchedule.from_betas("scaled_linear")

    def trainable(self, *, caption_dropout: float = 0.0, train_text_encoder: bool = False) -> nn.Module:
        raise NotImplementedError("the toy model does not train")

    def save(self, url: str, *, format: str | None = None) -> None:
        raise NotImplementedError("the toy model does not save")


def tiny_model(*, seed: int = 0) -> ToyModel:
    """A fresh :class:`ToyModel` with weights drawn from ``seed``."""
    return ToyModel(seed=seed)
