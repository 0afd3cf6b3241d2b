"""DeepFloyd IF's pixel-space UNet (the IF release of Saharia et al. 2022's Imagen design).

The network diffusers runs as ``UNet2DConditionModel`` with IF's configuration, written out as
one readable module: ResBlocks with scale-shift time conditioning that also resample
(``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``), "simple" attention whose keys and
values are the text tokens' projections concatenated before the image's own
(``AttnAddedKVProcessor``), T5 tokens projected by ``text_proj`` and attention-pooled into the
time embedding (``TextTimeEmbedding``), and for stage II the noise level of the low-resolution
image as a second timestep embedding (``class_embed_type = "timestep"``).

Parameter names follow diffusers' layout, so a diffusers IF folder's weights load one to one.
The output has ``out_channels`` = 2 x image channels: eps and the ``learned_range`` variance
interpolation (Nichol & Dhariwal 2021, eq. 15).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.interfaces import Conditioning, DenoiserNet
from t2i_engine.nn import ops
from t2i_engine.nn.embeddings import timestep_embedding


def _ints(value: object) -> tuple[int, ...]:
    return tuple(int(v) for v in value)  # type: ignore[attr-defined]


@attrs.frozen
class IFUNetConfig:
    """Architecture of an :class:`IFUNet` (read from a diffusers ``unet/config.json``)."""

    in_channels: int = 3  # 3 (stage I) or 6 (stage II: noisy image + upsampled low-res image)
    out_channels: int = 6  # eps and the learned_range variance
    channels: tuple[int, ...] = attrs.field(default=(704, 1408, 2112, 2816), converter=_ints)  # per level
    attention: tuple[bool, ...] = attrs.field(default=(False, True, True, True))  # SimpleCrossAttn per level
    head_dim: int = 64  # attention_head_dim (heads = channels // head_dim)
    layers_per_block: int = 3  # ResBlocks per down level (up levels have one more)
    cross_attention_dim: int = 2816  # width text_proj maps T5 tokens to
    encoder_hid_dim: int = 4096  # T5 width
    pool_heads: int = 64  # addition_embed_type_num_heads of the text attention pooling
    groups: int = 32  # GroupNorm groups (norm_num_groups)
    norm_eps: float = 1e-5  # GroupNorm eps (norm_eps)
    flip_sin_to_cos: bool = True  # timestep sinusoid layout
    freq_shift: float = 0.0  # timestep sinusoid shift
    time_embedding_dim: int | None = None  # None: 4 x channels[0]
    time_embedding_act: bool = False  # GELU on the summed embedding (time_embedding_act_fn, stage II)
    class_embed: bool = False  # noise-level embedding (class_embed_type "timestep", stage II)
    resnet_out_scale: float = 1.0  # resnet_out_scale_factor (stage II: sqrt 2)
    mid_block_scale: float = 1.0  # mid_block_scale_factor (stage II: sqrt 2)
    skip_time_act: bool = False  # resnet_skip_time_act (stage II)
    only_cross_attention: bool = False  # attention over text only (no self keys)
    cross_attention_norm: bool = True  # GroupNorm over the text tokens before add_k/v_proj

    @property
    def temb_dim(self) -> int:
        """Width of the time embedding."""
        return self.time_embedding_dim or 4 * self.channels[0]


class ResBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` as IF configures it: GELU, scale-shift norm, optional
    nearest 2x upsampling or 2x average-pool downsampling inside the block."""

    def __init__(self, in_ch: int, out_ch: int, cfg: IFUNetConfig, *, scale: float, resample: str = "") -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.groups, in_ch, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.temb_dim, 2 * out_ch)  # scale and shift
        self.norm2 = nn.GroupNorm(cfg.groups, out_ch, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.skip_time_act, self.scale, self.resample = cfg.skip_time_act, scale, resample

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = F.gelu(self.norm1(x))
        x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        t = self.time_emb_proj(temb if self.skip_time_act else F.gelu(temb))[:, :, None, None]
        t_scale, t_shift = t.chunk(2, dim=1)
        h = self.norm2(h) * (1 + t_scale) + t_shift
        h = self.conv2(F.gelu(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.scale


class AddedKVAttention(nn.Module):
    """Self-attention whose keys/values are the text tokens' projections followed by the image's
    own (diffusers' ``Attention`` with ``added_kv_proj_dim`` and ``AttnAddedKVProcessor``)."""

    def __init__(self, ch: int, cfg: IFUNetConfig) -> None:
        super().__init__()
        self.heads = ch // cfg.head_dim
        inner = self.heads * cfg.head_dim
        self.group_norm = nn.GroupNorm(cfg.groups, ch, eps=1e-5)
        self.norm_cross = nn.GroupNorm(32, cfg.cross_attention_dim, eps=1e-5) if cfg.cross_attention_norm else None
        self.to_q = nn.Linear(ch, inner)
        self.only_cross = cfg.only_cross_attention
        if not self.only_cross:
            self.to_k, self.to_v = nn.Linear(ch, inner), nn.Linear(ch, inner)
        self.add_k_proj = nn.Linear(cfg.cross_attention_dim, inner)
        self.add_v_proj = nn.Linear(cfg.cross_attention_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, ch), nn.Dropout(0.0)])

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.reshape(B, L, self.heads, -1).transpose(1, 2)  # (B, heads, L, head_dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        if self.norm_cross is not None:
            context = self.norm_cross(context.transpose(1, 2)).transpose(1, 2)
        h = self.group_norm(x.reshape(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        k, v = self.add_k_proj(context), self.add_v_proj(context)  # (B, L, inner)
        if not self.only_cross:
            k, v = torch.cat([k, self.to_k(h)], dim=1), torch.cat([v, self.to_v(h)], dim=1)
        out = ops.attention(self._heads(self.to_q(h)), self._heads(k), self._heads(v))  # (B, heads, HW, d)
        out = self.to_out[0](out.transpose(1, 2).reshape(B, H * W, -1))  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class Level(nn.Module):
    """One resolution level: ResBlocks, each followed by attention when the level has it, then an
    optional resampling ResBlock (``downsamplers`` / ``upsamplers`` in diffusers' names)."""

    def __init__(self, in_chs: list[int], out_ch: int, cfg: IFUNetConfig, *, attention: bool, resample: str) -> None:
        super().__init__()
        s = cfg.resnet_out_scale
        self.resnets = nn.ModuleList(ResBlock(c, out_ch, cfg, scale=s) for c in in_chs)
        self.attentions = nn.ModuleList(AddedKVAttention(out_ch, cfg) for _ in in_chs) if attention else None
        name = "downsamplers" if resample == "down" else "upsamplers"
        if resample:
            setattr(self, name, nn.ModuleList([ResBlock(out_ch, out_ch, cfg, scale=s, resample=resample)]))
        self.resample = resample

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, skips: list[Tensor] | None = None,
                outputs: list[Tensor] | None = None) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            if skips is not None:  # decoder: concatenate the matching encoder output
                x = torch.cat([x, skips.pop()], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            if outputs is not None:
                outputs.append(x)
        if self.resample:
            x = getattr(self, f"{self.resample}samplers")[0](x, temb)
            if outputs is not None:
                outputs.append(x)
        return x


class MidBlock(nn.Module):
    """ResBlock, then (attention, ResBlock) (``UNetMidBlock2DSimpleCrossAttn``)."""

    def __init__(self, ch: int, cfg: IFUNetConfig) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(ch, ch, cfg, scale=cfg.mid_block_scale) for _ in range(2))
        self.attentions = nn.ModuleList([AddedKVAttention(ch, cfg)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, temb), context), temb)


class TimestepMLP(nn.Module):
    """linear -> GELU -> linear (diffusers' ``TimestepEmbedding`` with ``act_fn="gelu"``)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class AttentionPooling(nn.Module):
    """IF's attention pooling of the text tokens into one vector (CLIP-style, a mean "class"
    token plus a learned position attends over itself and the tokens)."""

    def __init__(self, heads: int, dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(1, dim) / dim**0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        cls = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, L + 1, D)

        def split(t: Tensor) -> Tensor:
            return t.reshape(B, -1, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, T, d)

        out = ops.attention(split(self.q_proj(cls)), split(self.k_proj(x)), split(self.v_proj(x)))
        return out.transpose(1, 2).reshape(B, D)  # (B, D)


class TextTimeEmbedding(nn.Module):
    """LayerNorm -> attention pooling -> linear -> LayerNorm: the text's share of the time embedding."""

    def __init__(self, text_dim: int, temb_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.pool = nn.LayerNorm(text_dim), AttentionPooling(heads, text_dim)
        self.proj, self.norm2 = nn.Linear(text_dim, temb_dim), nn.LayerNorm(temb_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(tokens))))


class IFUNet(DenoiserNet):
    """DeepFloyd IF stage I / II UNet; ``forward(x_t, t, cond)`` returns eps and the variance
    interpolation ``v`` concatenated ``(B, out_channels, H, W)``.

    ``cond.text.tokens`` are the T5 hidden states; stage II reads the noise level of its
    low-resolution input from ``cond.extras["noise_level"]`` ``(B,)`` and the upsampled image
    from ``cond.extras["lowres"]`` ``(B, 3, H, W)`` (concatenated to ``x_t``).
    """

    prediction = "eps"

    def __init__(self, config: IFUNetConfig) -> None:
        super().__init__()
        cfg = self.config = config
        ch, n = cfg.channels, len(cfg.channels)
        self.time_embedding = TimestepMLP(ch[0], cfg.temb_dim)
        self.class_embedding = TimestepMLP(ch[0], cfg.temb_dim) if cfg.class_embed else None
        self.add_embedding = TextTimeEmbedding(cfg.encoder_hid_dim, cfg.temb_dim, cfg.pool_heads)
        self.encoder_hid_proj = nn.Linear(cfg.encoder_hid_dim, cfg.cross_attention_dim)  # diffusers' text_proj
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        L = cfg.layers_per_block
        self.down_blocks = nn.ModuleList(
            Level([ch[max(i - 1, 0)]] + [ch[i]] * (L - 1), ch[i], cfg, attention=cfg.attention[i],
                  resample="down" if i < n - 1 else "") for i in range(n))
        self.mid_block = MidBlock(ch[-1], cfg)
        skip_chs = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(L + (i < n - 1))]
        ups = []
        prev = ch[-1]
        for i in reversed(range(n)):
            in_chs = [(prev if j == 0 else ch[i]) + skip_chs.pop() for j in range(L + 1)]
            ups.append(Level(in_chs, ch[i], cfg, attention=cfg.attention[i], resample="up" if i > 0 else ""))
            prev = ch[i]
        self.up_blocks = nn.ModuleList(ups)
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _sinusoid(self, t: Tensor) -> Tensor:
        return timestep_embedding(t, self.config.channels[0], flip_sin_to_cos=self.config.flip_sin_to_cos,
                                  freq_shift=self.config.freq_shift)

    def _embedding(self, t: Tensor, tokens: Tensor, cond: Conditioning, dtype: torch.dtype) -> Tensor:
        emb = self.time_embedding(self._sinusoid(t).to(dtype))  # (B, temb)
        if self.class_embedding is not None:
            if "noise_level" not in cond.extras:
                raise ValueError("IF stage II UNet: the conditioning lacks extras['noise_level'] (the low-res noise level)")
            level = cond.extras["noise_level"].to(t.device).reshape(-1).expand(t.shape[0])
            emb = emb + self.class_embedding(self._sinusoid(level).to(dtype))
        emb = emb + self.add_embedding(tokens)
        return F.gelu(emb) if self.config.time_embedding_act else emb

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if cond.text is None:
            raise ValueError("IF UNet: the conditioning has no text embedding")
        tokens = cond.text.tokens.to(x_t.dtype)  # (B, L, encoder_hid_dim)
        if "lowres" in cond.extras:
            x_t = torch.cat([x_t, cond.extras["lowres"].to(x_t)], dim=1)  # (B, 6, H, W)
        if x_t.shape[1] != self.config.in_channels:
            raise ValueError(f"IF UNet takes {self.config.in_channels} input channels, got {x_t.shape[1]} "
                             "(stage II needs extras['lowres'])")
        t = t.reshape(-1).expand(x_t.shape[0])
        temb = self._embedding(t, tokens, cond, x_t.dtype)
        context = self.encoder_hid_proj(tokens)  # (B, L, cross_attention_dim)
        h = self.conv_in(x_t)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, context, outputs=skips)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            h = block(h, temb, context, skips=skips)
        return self.conv_out(F.gelu(self.conv_norm_out(h)))


