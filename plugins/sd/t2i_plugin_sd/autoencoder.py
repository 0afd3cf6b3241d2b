"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, appendix G).

Images ``(B, 3, H, W)`` in [-1, 1] map to a diagonal Gaussian over latents
``(B, C, H/f, W/f)`` with ``f = 2 ** (levels - 1)``. The latent scaling factor (0.18215 for the
SD 1/2 VAE) belongs to this object: :meth:`AutoencoderKL.encode` returns scaled latents and
:meth:`AutoencoderKL.decode` takes them. Parameter names follow diffusers' ``AutoencoderKL``.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import Tensor, nn

from t2i_engine.nn import Downsample, GroupNorm, ResBlock, SpatialSelfAttention, Upsample, ops


@attrs.frozen
class AutoencoderConfig:
    """Architecture of the KL autoencoder."""

    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels the decoder writes
    latent_channels: int = 4  # channels of the latent the UNet sees
    channels: tuple[int, ...] = attrs.field(default=(128, 256, 512, 512), converter=lambda v: tuple(int(x) for x in v))
    layers_per_block: int = 2  # ResBlocks per encoder level (decoder levels have one more)
    groups: int = 32  # GroupNorm groups
    scaling_factor: float = 0.18215  # latents are multiplied by it after encoding


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(ch, ch, groups=groups, eps=1e-6) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(ch, groups=groups)])

    def forward(self, h: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](h)))


class _Level(nn.Module):
    def __init__(self, chans: Sequence[tuple[int, int]], groups: int, *, down: bool = False, up: bool = False) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(i, o, groups=groups, eps=1e-6) for i, o in chans)
        out = chans[-1][1]
        if down:
            self.downsamplers = nn.ModuleList([Downsample(out, asymmetric_pad=True)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample(out)])

    def forward(self, h: Tensor) -> Tensor:
        for r in self.resnets:
            h = r(h)
        for s in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            h = s(h)
        return h


class Encoder(nn.Module):
    """Image -> Gaussian moments ``(B, 2*latent, h, w)`` (before ``quant_conv``)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch, n, g = cfg.channels, cfg.layers_per_block, cfg.groups
        self.conv_in = ops.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _Level([(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i]) for j in range(n)], g, down=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = _Mid(ch[-1], g)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=1e-6, activation="silu")
        self.conv_out = ops.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        return self.conv_out(self.conv_norm_out(self.mid_block(h)))


class Decoder(nn.Module):
    """Latent ``(B, latent, h, w)`` (after ``post_quant_conv``) -> image."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        rev, n, g = list(reversed(cfg.channels)), cfg.layers_per_block + 1, cfg.groups
        self.conv_in = ops.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = _Mid(rev[0], g)
        self.up_blocks = nn.ModuleList(
            _Level([(rev[max(i - 1, 0)] if j == 0 else rev[i], rev[i]) for j in range(n)], g, up=i < len(rev) - 1)
            for i in range(len(rev))
        )
        self.conv_norm_out = GroupNorm(g, rev[-1], eps=1e-6, activation="silu")
        self.conv_out = ops.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(self.conv_norm_out(h))


class AutoencoderKL(nn.Module):
    """The KL autoencoder; fulfils :class:`t2i_engine.interfaces.Autoencoder`."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.latent_channels = config.latent_channels
        self.downsample_factor = 2 ** (len(config.channels) - 1)
        self.scaling_factor = config.scaling_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = ops.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = ops.Conv2d(config.latent_channels, config.latent_channels, 1)

    def moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance (clamped to [-30, 20]) of unscaled latents."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> scaled latents; sampled with ``generator``, else the mean."""
        mean, logvar = self.moments(images)
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents / self.scaling_factor))
