"""Convolutional building blocks: GroupNorm, the residual block, down- and upsampling.

Parameter names follow the diffusers layout (``norm1``, ``conv1``, ``time_emb_proj`` ...) so
that checkpoints in that layout load without renaming.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.nn import ops
from t2i_engine.nn.checkpointing import checkpoint_call, wants_checkpoint


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that runs through the engine's op, optionally with a fused SiLU."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
                 activation: ops.Activation = None) -> None:
        super().__init__(num_groups, num_channels, eps=eps)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps,
                              activation=self.activation)


class ResBlock(nn.Module):
    """Residual block of two 3x3 convolutions with an optional timestep shift (DDPM, Ho 2020).

    ``x (B, in, H, W), temb (B, temb_dim) | None -> (B, out, H, W)``; with ``temb_dim=None``
    (autoencoders) there is no time projection.
    """

    gradient_checkpointing = False  # recompute in backward (nn/checkpointing.py)

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_dim: int | None = None,
                 groups: int = 32, eps: float = 1e-5, dropout: float = 0.0) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, activation="silu")
        self.conv1 = ops.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = ops.Linear(temb_dim, out_channels) if temb_dim else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, activation="silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = ops.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = ops.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        if wants_checkpoint(self):
            return checkpoint_call(self, self.forward, x, temb)
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None and temb is not None:
            h = ops.add_(h, self.time_emb_proj(F.silu(temb))[:, :, None, None])  # (B, out, 1, 1)
        h = self.conv2(self.dropout(self.norm2(h)))
        return ops.add_(h, x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution.

    ``asymmetric_pad`` pads only right and bottom before an unpadded convolution (the KL
    autoencoder's layout); otherwise the convolution pads by one on every side (the UNet's).
    """

    def __init__(self, channels: int, out_channels: int | None = None, *, asymmetric_pad: bool = False) -> None:
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = ops.Conv2d(channels, out_channels or channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour, or to ``size``) and smooth with a 3x3 convolution."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = ops.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
