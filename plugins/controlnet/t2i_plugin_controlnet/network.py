"""The ControlNet network (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to
Text-to-Image Diffusion Models", arXiv 2302.05543).

A trainable copy of the SD UNet's encoder (time embedding, ``conv_in``, down blocks, mid block:
the core's own blocks from :mod:`t2i_engine.nn.unet`, so there is no forked UNet) plus

* a hint encoder (``controlnet_cond_embedding``): 3x3 convs 3 -> 16 -> 16 -> 32/2 -> 32 -> 96/2
  -> 96 -> 256/2 -> C with SiLU between, the last one zero-initialised; its output is added to
  ``conv_in``'s (``input_hint_block`` in the original code);
* one zero-initialised 1x1 conv per encoder skip (``controlnet_down_blocks.N``) and one after
  the mid block (``controlnet_mid_block``): the residuals the UNet adds to its skips and middle.

Parameter names follow diffusers' ``ControlNetModel``, so its folders load one to one.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.nn import ops
from t2i_engine.nn.embeddings import TimestepEmbedding, timestep_embedding
from t2i_engine.nn.unet import DownBlock, MidBlock, UNetConfig

__all__ = ["ENCODER_PREFIXES", "ControlNet", "ControlNetConfig", "HintEncoder", "controlnet_from_unet"]


def _ints(value: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@attrs.frozen
class ControlNetConfig:
    """Architecture of a :class:`ControlNet`."""

    unet: UNetConfig  # the encoder copy: the base UNet's levels, heads, context width ...
    hint_channels: int = 3  # channels of the hint image (conditioning_channels)
    hint_widths: tuple[int, ...] = attrs.field(default=(16, 32, 96, 256), converter=_ints)  # hint encoder levels

    @property
    def hint_factor(self) -> int:
        """How much the hint encoder shrinks the hint (one stride-2 conv per level after the first)."""
        return 2 ** (len(self.hint_widths) - 1)


class HintEncoder(nn.Module):
    """Hint image ``(B, 3, H, W)`` in [0, 1] -> ``(B, C, H / f, W / f)`` added after ``conv_in``."""

    def __init__(self, out_channels: int, *, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 96, 256)) -> None:
        super().__init__()
        self.conv_in = ops.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            self.blocks.append(ops.Conv2d(a, a, 3, padding=1))
            self.blocks.append(ops.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = _zero(ops.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, hint: Tensor) -> Tensor:
        h = F.silu(self.conv_in(hint))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialised (the paper's "zero convolution": a fresh ControlNet changes nothing)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNet(nn.Module):
    """``(x_t, t, context, hint) -> (down residuals, mid residual)`` for the core UNet."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        u = config.unet
        ch = u.channels
        self.conv_in = ops.Conv2d(u.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], u.temb_dim)
        self.controlnet_cond_embedding = HintEncoder(ch[0], in_channels=config.hint_channels, widths=config.hint_widths)
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([_zero(ops.Conv2d(ch[0], ch[0], 1))])
        prev = ch[0]
        for i, out in enumerate(ch):
            last = i == len(ch) - 1
            self.down_blocks.append(DownBlock(prev, out, cfg=u, level=i, downsample=not last))
            n = u.layers_per_block + (0 if last else 1)  # one skip per ResBlock, one per downsampler
            self.controlnet_down_blocks.extend(_zero(ops.Conv2d(out, out, 1)) for _ in range(n))
            prev = out
        self.mid_block = MidBlock(ch[-1], cfg=u)
        self.controlnet_mid_block = _zero(ops.Conv2d(ch[-1], ch[-1], 1))

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor | None, hint: Tensor, *,
                mask: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """``x_t`` ``(B, C, h, w)``, ``t`` ``(B,)`` or scalar, ``context`` ``(B, L, D)``, ``hint``
        ``(B, 3, h * f, w * f)`` -> one residual per UNet skip and the mid residual."""
        u = self.config.unet
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        temb = timestep_embedding(t, u.channels[0], flip_sin_to_cos=u.flip_sin_to_cos,
                                  freq_shift=u.freq_shift).to(x_t.dtype)
        temb = self.time_embedding(temb)  # (B, temb_dim)
        h = self.conv_in(x_t) + self.controlnet_cond_embedding(hint.to(x_t.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, mask)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, context, mask)
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        return down, self.controlnet_mid_block(h)


ENCODER_PREFIXES = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")
"""The parameters a ControlNet shares (by name) with the UNet it copies: its encoder."""


def controlnet_from_unet(unet: nn.Module, *, hint_channels: int = 3,
                         hint_widths: tuple[int, ...] = (16, 32, 96, 256)) -> ControlNet:
    """A fresh ControlNet for the core UNet ``unet`` (the paper's initialisation, diffusers'
    ``ControlNetModel.from_unet``): the encoder (``conv_in``, time embedding, down blocks, mid
    block) a copy of the UNet's weights, the hint encoder random but its last conv zero, every
    zero conv zero, so its first residuals are exactly 0."""
    net = ControlNet(ControlNetConfig(unet.config, hint_channels=hint_channels,  # type: ignore[arg-type]
                                      hint_widths=hint_widths))
    encoder = {k: v for k, v in unet.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    missing, unexpected = net.load_state_dict(encoder, strict=False)
    own = [k for k in missing if k.startswith(ENCODER_PREFIXES)]
    if own or unexpected:  # the encoder copy must take every UNet encoder weight, and only those
        raise ValueError(f"the ControlNet encoder does not match the UNet's: missing {own[:3]}, "
                         f"unexpected {unexpected[:3]}")
    param = next(unet.parameters(), None)
    return net.to(param.device if param is not None else "cpu")


def guess_mode_scales(n: int, *, law: str) -> Tensor:
    """Per-residual multipliers of guess mode for ``n`` residuals (downs, then mid), shallow to deep.

    ``"diffusers"``: ``logspace(-1, 0, n)`` (``ControlNetModel``, 0.1 ... 1.0); ``"original"``:
    ``0.825 ** (n - 1 - i)`` (lllyasviel's ``gradio_*.py``, also A1111's soft injection).
    """
    if law == "diffusers":
        return torch.logspace(-1, 0, n, dtype=torch.float64)
    if law == "original":
        return torch.tensor([0.825 ** (n - 1 - i) for i in range(n)], dtype=torch.float64)
    raise ValueError(f"unknown guess-mode law {law!r}; 'diffusers' or 'original'")
