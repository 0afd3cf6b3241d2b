"""The text-conditioned UNet of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"), built from the blocks of this package.

One class covers Stable Diffusion 1.x and 2.x and the variants that reuse them (ControlNet's
encoder copy, InstructPix2Pix's wider input). Parameter names follow the diffusers
``UNet2DConditionModel`` layout (``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k``),
so weights in that layout load one to one and other layouts are renamed once at load time.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from torch import Tensor, nn

from t2i_engine.interfaces import Conditioning, DenoiserNet, Prediction
from t2i_engine.nn import ops
from t2i_engine.nn.attention import SpatialTransformer
from t2i_engine.nn.embeddings import TimestepEmbedding, timestep_embedding
from t2i_engine.nn.resblock import Downsample, GroupNorm, ResBlock, Upsample


def _ints(value: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _bools(value: Sequence[bool]) -> tuple[bool, ...]:
    return tuple(bool(v) for v in value)


def _depths(value: int | Sequence[int]) -> tuple[int, ...]:
    return (int(value),) if isinstance(value, int) else _ints(value)


@attrs.frozen
class UNetConfig:
    """Architecture of a :class:`UNet` (every field is read from a checkpoint when one is loaded)."""

    in_channels: int = 4  # latent channels in (8 for InstructPix2Pix's concatenated input)
    out_channels: int = 4  # channels predicted
    channels: tuple[int, ...] = attrs.field(default=(320, 640, 1280, 1280), converter=_ints)  # per level
    attention: tuple[bool, ...] = attrs.field(default=(True, True, True, False), converter=_bools)  # cross-attn per level
    heads: tuple[int, ...] = attrs.field(default=(8, 8, 8, 8), converter=_ints)  # attention heads per level
    layers_per_block: int = 2  # ResBlocks per down level (up levels have one more)
    context_dim: int = 768  # width of the text tokens cross-attention reads
    transformer_depth: tuple[int, ...] = attrs.field(default=(1,), converter=_depths)  # per level (one = all)
    linear_projection: bool = False  # SD 2: linear proj_in/proj_out instead of 1x1 convolutions
    groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-5  # GroupNorm eps of the ResBlocks and the output norm (transformers use 1e-6)
    upcast_attention: bool = False  # attention in float32 under half precision (SD 2.1's 768 model)
    dropout: float = 0.0  # ResBlock dropout (training only)
    flip_sin_to_cos: bool = True  # timestep sinusoid layout (cos first)
    freq_shift: float = 0.0  # timestep sinusoid frequency shift
    use_text_mask: bool = False  # mask padded text tokens in cross-attention (SD does not)
    prediction: Prediction = "eps"  # what the network predicts

    def __attrs_post_init__(self) -> None:
        n = len(self.channels)
        if len(self.attention) != n or len(self.heads) != n:
            raise ValueError(f"UNetConfig: channels, attention and heads need one entry per level ({n})")
        if len(self.transformer_depth) == 1:
            object.__setattr__(self, "transformer_depth", self.transformer_depth * n)
        elif len(self.transformer_depth) != n:
            raise ValueError(f"UNetConfig: transformer_depth needs one entry or one per level ({n})")

    @property
    def temb_dim(self) -> int:
        """Width of the timestep embedding (4x the first level's channels)."""
        return self.channels[0] * 4


class DownBlock(nn.Module):
    """One encoder level: ResBlocks (each followed by a spatial transformer when ``attention``)
    and an optional stride-2 downsampler."""

    def __init__(self, in_ch: int, out_ch: int, *, cfg: UNetConfig, level: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resblock(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(cfg.layers_per_block)
        )
        self.attentions = nn.ModuleList(
            _transformer(out_ch, cfg, level) for _ in range(cfg.layers_per_block)
        ) if cfg.attention[level] else None
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, h: Tensor, temb: Tensor, context: Tensor | None, mask: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context, context_mask=mask)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """One decoder level: ResBlocks over the concatenated skip connections (plus spatial
    transformers when ``attention``) and an optional upsampler."""

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, *, cfg: UNetConfig, level: int,
                 upsample: bool) -> None:
        super().__init__()
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(
            _resblock((prev_ch if i == 0 else out_ch) + (in_ch if i == n - 1 else out_ch), out_ch, cfg)
            for i in range(n)
        )
        self.attentions = nn.ModuleList(
            _transformer(out_ch, cfg, level) for _ in range(n)
        ) if cfg.attention[level] else None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, h: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor | None,
                mask: Tensor | None, size: tuple[int, int] | None) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(_cat(h, skips.pop()), temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context, context_mask=mask)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)
        return h


class MidBlock(nn.Module):
    """ResBlock, spatial transformer, ResBlock at the lowest resolution."""

    def __init__(self, ch: int, *, cfg: UNetConfig) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_resblock(ch, ch, cfg) for _ in range(2))
        self.attentions = nn.ModuleList([_transformer(ch, cfg, len(cfg.channels) - 1)])

    def forward(self, h: Tensor, temb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context, context_mask=mask)
        return self.resnets[1](h, temb)


def _resblock(in_ch: int, out_ch: int, cfg: UNetConfig) -> ResBlock:
    return ResBlock(in_ch, out_ch, temb_dim=cfg.temb_dim, groups=cfg.groups, eps=cfg.norm_eps, dropout=cfg.dropout)


def _transformer(ch: int, cfg: UNetConfig, level: int) -> SpatialTransformer:
    """The spatial transformer of ``level`` (the mid block uses the deepest level's heads and depth)."""
    return SpatialTransformer(ch, heads=cfg.heads[level], context_dim=cfg.context_dim,
                              depth=cfg.transformer_depth[level], groups=cfg.groups,
                              linear_projection=cfg.linear_projection, upcast=cfg.upcast_attention)


def _cat(h: Tensor, skip: Tensor) -> Tensor:
    import torch

    return torch.cat([h, skip], dim=1)


class UNet(DenoiserNet):
    """Text-conditioned UNet: ``(x_t (B, C, h, w), t (B,), cond) -> (B, out, h, w)``.

    The text context is ``cond.text.tokens``; ``cond.extras["concat"]`` (when present) is
    concatenated to the input channels. ``down_residuals``/``mid_residual`` add ControlNet
    residuals to the skip connections and the mid block.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.prediction = config.prediction
        ch = config.channels
        self.conv_in = ops.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], config.temb_dim)
        self.down_blocks = nn.ModuleList()
        prev = ch[0]
        for i, out in enumerate(ch):
            self.down_blocks.append(DownBlock(prev, out, cfg=config, level=i, downsample=i < len(ch) - 1))
            prev = out
        self.mid_block = MidBlock(ch[-1], cfg=config)
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(range(len(ch))))
        prev = ch[-1]
        for j, level in enumerate(rev):
            in_ch = ch[max(level - 1, 0)]
            self.up_blocks.append(UpBlock(in_ch, prev, ch[level], cfg=config, level=level, upsample=j < len(ch) - 1))
            prev = ch[level]
        self.conv_norm_out = GroupNorm(config.groups, ch[0], eps=config.norm_eps, activation="silu")
        self.conv_out = ops.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, *,  # type: ignore[override]
                down_residuals: Sequence[Tensor] | None = None, mid_residual: Tensor | None = None) -> Tensor:
        if "concat" in cond.extras:
            x_t = _cat(x_t, cond.extras["concat"].to(x_t.dtype))
        context = mask = None
        if cond.text is not None:
            context = cond.text.tokens.to(x_t.dtype)
            mask = cond.text.mask if self.config.use_text_mask else None
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        temb = timestep_embedding(t, self.config.channels[0], flip_sin_to_cos=self.config.flip_sin_to_cos,
                                  freq_shift=self.config.freq_shift).to(x_t.dtype)
        temb = self.time_embedding(temb)  # (B, temb_dim)
        h = self.conv_in(x_t)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, mask)
            skips.extend(block_skips)
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        h = self.mid_block(h, temb, context, mask)
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # upsample to the next skip's size so odd latent sizes come back exactly
            size = tuple(skips[-1].shape[-2:]) if skips and block.upsamplers is not None else None
            h = block(h, block_skips, temb, context, mask, size)  # type: ignore[arg-type]
        return self.conv_out(self.conv_norm_out(h))
