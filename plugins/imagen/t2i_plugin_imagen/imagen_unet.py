"""The Imagen UNets (Saharia et al. 2022): the base UNet and the Efficient U-Net of the
super-resolution stages, configured with NeMo's keys (``examples/multimodal/text_to_image/imagen/conf``,
``unet_type: base | sr``) and laid out as NeMo's ``UNetModel`` / ``EfficientUNetModel``.

Both networks take ``forward(x_t, t, cond)``:

* ``t``: the preconditioning's time input (EDM ``ln(sigma)/4``, continuous DDPM the log-SNR);
* ``cond.text``: T5 tokens ``(B, L, text_embed_dim)`` and their mask. The tokens are projected to
  ``cond_dim`` for cross-attention (``text_to_cond``) and pooled (attention pooling or the mean)
  into the time embedding (``to_text_non_attn_cond``); ``use_null_token`` appends a learned token
  every query can attend to;
* ``cond.extras["lowres"]`` (super-resolution): the low-resolution image, bicubic-upsampled here
  when smaller, concatenated to ``x_t``; ``cond.extras["lowres_t"]`` its augmentation level's
  time input (``noise_cond_aug``), embedded like ``t`` and added.

The Efficient U-Net (Imagen fig. A.28-A.30) downsamples at the start of each level and upsamples
at the end (``DBlock``/``UBlock``), puts more blocks at the low resolutions (``num_resblocks``),
attention only where ``atnn_enabled_at`` says, adds (not concatenates) its skips, and scales its
block shortcuts by ``1/sqrt(2)`` (``skip_connection_scaling``).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.interfaces import Conditioning, DenoiserNet, Prediction
from t2i_plugin_imagen.imagen_blocks import (EfficientResBlock, ResBlock, Resample, SelfAttentionPooling,
                                             attention_block, heads_of, time_embedding, zero_init)


def _ints(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    return tuple(int(v) for v in value)


def _positive(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    values = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"'{attr.name}' must be positive integers, got {value!r}")


def _field(default: Any, **kw: Any) -> Any:
    return attrs.field(default=default, **kw)


@attrs.frozen(kw_only=True)
class _Common:
    """Keys both UNets share (NeMo's names)."""

    embed_dim: int = _field(128, validator=_positive)  # channels of level 1 / mult; time embedding 4x this
    image_size: int = _field(64, validator=_positive)  # the output side (attention_resolutions are relative)
    channels: int = _field(3, validator=_positive)  # image channels
    text_embed_dim: int = _field(4096, validator=_positive)  # T5 width
    channel_mult: tuple[int, ...] = _field((1, 2, 3, 4), converter=_ints, validator=_positive)  # per level
    num_attn_heads: int = _field(4, validator=_positive)  # heads when per_head_channels <= 0
    per_head_channels: int = _field(64)  # channels per head (> 0 overrides num_attn_heads)
    attention_type: Literal["fused", "stacked"] = _field("fused", validator=attrs.validators.in_(("fused", "stacked")))
    feature_pooling_type: Literal["attention", "mean"] = _field(
        "attention", validator=attrs.validators.in_(("attention", "mean")))  # text pooled into the time embedding
    learned_sinu_pos_emb_dim: int = _field(16)  # learned Fourier time features (0: fixed sinusoid)
    use_null_token: bool = _field(False)  # a learned extra text token (always attendable)
    init_conv_kernel_size: int = _field(3, validator=_positive)
    scale_shift_norm: bool = _field(True)  # time embedding as scale and shift (else added)
    noise_cond_aug: bool = _field(False)  # embed the low-res augmentation level (extras["lowres_t"])
    norm_groups: int = _field(32, validator=_positive)  # GroupNorm groups (NeMo: always 32)


@attrs.frozen(kw_only=True)
class BaseUNetConfig(_Common):
    """``unet_type = "base"``: NeMo ``UNetModel`` (the 64 px base, or a super-resolution UNet with
    ``low_res_cond``)."""

    num_res_blocks: tuple[int, ...] = _field((3,), converter=_ints, validator=_positive)  # per level (one: all)
    cond_dim: int = _field(512, validator=_positive)  # width of the projected text tokens
    attention_resolutions: tuple[int, ...] = _field((8, 16, 32), converter=_ints, validator=_positive)
    dropout: float = _field(0.0)
    resblock_updown: bool = _field(False)  # resample with ResBlocks (else conv / transposed conv)
    resample_with_conv: bool = _field(True)  # downsample by a stride-2 conv (else average pooling)
    low_res_cond: bool = _field(False)  # concatenate the upsampled low-res image (extras["lowres"])


@attrs.frozen(kw_only=True)
class EfficientUNetConfig(_Common):
    """``unet_type = "sr"``: NeMo ``EfficientUNetModel`` (always low-res conditioned)."""

    channel_mult: tuple[int, ...] = _field((1, 1, 2, 4, 8), converter=_ints, validator=_positive)
    num_resblocks: tuple[int, ...] = _field((1, 2, 4, 8, 8), converter=_ints, validator=_positive)  # per level
    atnn_enabled_at: tuple[int, ...] = _field((0, 0, 0, 0, 1), converter=_ints)  # 1: attention at that level
    num_attn_heads: int = _field(8, validator=_positive)
    stride: int = _field(2, validator=_positive)  # resampling factor per level
    skip_connection_scaling: bool = _field(False)  # 1/sqrt(2) on the block shortcuts


UNetConfig = BaseUNetConfig | EfficientUNetConfig


class _ImagenNet(DenoiserNet):
    """What both UNets share: the time, low-res-level and text embeddings (NeMo's parameter names)."""

    prediction: Prediction = "edm"  # set by the stage from its preconditioning

    def _init_conditioning(self, cfg: _Common, cond_dim: int) -> None:
        temb = 4 * cfg.embed_dim
        self.time_embed = time_embedding(cfg.embed_dim, cfg.learned_sinu_pos_emb_dim)
        if cfg.noise_cond_aug:
            self.lowres_time_embed = time_embedding(cfg.embed_dim, cfg.learned_sinu_pos_emb_dim)
        if cfg.feature_pooling_type == "attention":
            self.attention_pooling = nn.Sequential(SelfAttentionPooling(cfg.text_embed_dim),
                                                   nn.LayerNorm(cfg.text_embed_dim), nn.Linear(cfg.text_embed_dim, cond_dim))
        self.text_to_cond = nn.Linear(cfg.text_embed_dim, cond_dim)
        self.to_text_non_attn_cond = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, temb), nn.SiLU(),
                                                   nn.Linear(temb, temb))
        if cfg.use_null_token:
            self.null_text_embedding = nn.Parameter(torch.randn(1, 1, cond_dim))

    def _embed(self, t: Tensor, cond: Conditioning, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(emb (B, 4 embed_dim), context (B, L', cond_dim), context mask (B, L'))``."""
        cfg: _Common = self.config  # type: ignore[attr-defined]
        if cond.text is None:
            raise ValueError("Imagen UNet: the conditioning has no text embedding")
        tokens = cond.text.tokens.to(dtype)  # (B, L, text_embed_dim)
        B = tokens.shape[0]
        mask = cond.text.mask
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
        emb = self.time_embed(t.reshape(-1).expand(B).float()).to(dtype)
        if cfg.noise_cond_aug:
            if "lowres_t" not in cond.extras:
                raise ValueError("Imagen UNet (noise_cond_aug): the conditioning lacks extras['lowres_t']")
            emb = emb + self.lowres_time_embed(cond.extras["lowres_t"].reshape(-1).expand(B).float()).to(dtype)
        context = self.text_to_cond(tokens)  # (B, L, cond_dim)
        pooled = self.attention_pooling(tokens) if cfg.feature_pooling_type == "attention" else context.mean(dim=1)
        emb = emb + self.to_text_non_attn_cond(pooled)
        if cfg.use_null_token:
            context = torch.cat([context, self.null_text_embedding.to(dtype).expand(B, -1, -1)], dim=1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=mask.device)], dim=1)
        return emb, context, mask

    @staticmethod
    def _with_lowres(x_t: Tensor, cond: Conditioning) -> Tensor:
        if "lowres" not in cond.extras:
            raise ValueError("Imagen super-resolution UNet: the conditioning lacks extras['lowres'] (the low-res image)")
        low = cond.extras["lowres"].to(x_t)
        if low.shape[-2:] != x_t.shape[-2:]:
            low = F.interpolate(low, size=tuple(x_t.shape[-2:]), mode="bicubic")
        return torch.cat([x_t, low], dim=1)  # (B, 2C, H, W)


class _Step(nn.ModuleList):
    """One entry of ``input_blocks`` / ``output_blocks``: layers run in order, each given what it
    takes (NeMo's ``ConditionalSequential``; keys ``<i>.<j>.*``)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, (nn.Conv2d, Resample, nn.AvgPool2d)):
                x = layer(x)
            else:
                x = layer(x, context, mask)
        return x


class ImagenUNet(_ImagenNet):
    """Imagen's base UNet (NeMo ``UNetModel``): ResBlocks with scale-shift norm, text attention at
    ``attention_resolutions``, a middle block, concatenated skips, a zero-initialised output conv."""

    def __init__(self, config: BaseUNetConfig) -> None:
        super().__init__()
        cfg = self.config = config
        mults, E, G = cfg.channel_mult, cfg.embed_dim, cfg.norm_groups
        blocks = cfg.num_res_blocks if len(cfg.num_res_blocks) > 1 else cfg.num_res_blocks * len(mults)
        if len(blocks) != len(mults):
            raise ValueError(f"num_res_blocks has {len(blocks)} entries for {len(mults)} levels (channel_mult)")
        self._init_conditioning(cfg, cfg.cond_dim)
        temb = 4 * E
        attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
        k = cfg.init_conv_kernel_size
        in_ch = 2 * cfg.channels if cfg.low_res_cond else cfg.channels

        def res(ch: int, out: int, **kw: Any) -> ResBlock:
            return ResBlock(ch, temb, out, groups=G, scale_shift_norm=cfg.scale_shift_norm, dropout=cfg.dropout, **kw)

        def attn(ch: int) -> nn.Module:
            heads = heads_of(ch, num_heads=cfg.num_attn_heads, head_channels=cfg.per_head_channels)
            return attention_block(cfg.attention_type, ch, cfg.cond_dim, heads=heads, groups=G)

        ch, ds = E * mults[0], 1
        self.input_blocks = nn.ModuleList([_Step([nn.Conv2d(in_ch, ch, k, padding=k // 2)])])
        skip_chs = [ch]
        for level, mult in enumerate(mults):
            for _ in range(blocks[level]):
                layers: list[nn.Module] = [res(ch, mult * E)]
                ch = mult * E
                if ds in attn_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(_Step(layers))
                skip_chs.append(ch)
            if level < len(mults) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else \
                    Resample(ch, "down") if cfg.resample_with_conv else nn.AvgPool2d(2)
                self.input_blocks.append(_Step([down]))
                skip_chs.append(ch)
                ds *= 2
        self.middle_block = _Step([res(ch, ch), attn(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(blocks[level] + 1):
                layers = [res(ch + skip_chs.pop(), mult * E)]
                ch = mult * E
                if ds in attn_ds:
                    layers.append(attn(ch))
                if level and i == blocks[level]:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Resample(ch, "up"))
                    ds //= 2
                self.output_blocks.append(_Step(layers))
        self.out = nn.Sequential(nn.GroupNorm(G, ch), nn.SiLU(),
                                 zero_init(nn.Conv2d(E * mults[0], cfg.channels, k, padding=k // 2)))

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if self.config.low_res_cond:
            x_t = self._with_lowres(x_t, cond)
        emb, context, mask = self._embed(t, cond, x_t.dtype)
        h, skips = x_t, []
        for block in self.input_blocks:
            h = block(h, emb, context, mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, mask)
        return self.out(h)


class _Level(nn.Module):
    """One Efficient U-Net level, down (``DBlock``: resample first) or up (``UBlock``: resample last)."""

    def __init__(self, ch_in: int, ch_out: int, temb: int, cfg: EfficientUNetConfig, *, blocks: int,
                 attention: bool, resample: str) -> None:
        super().__init__()
        G = cfg.norm_groups
        if resample == "down":
            self.conv: nn.Module = nn.Conv2d(ch_in, ch_in, 4, stride=cfg.stride, padding=1)
        elif resample == "up":
            self.conv = nn.ConvTranspose2d(ch_out, ch_out, 4, cfg.stride, 1)
        self.resample = resample
        self.blocks = nn.ModuleList(
            EfficientResBlock(ch_in if i == 0 else ch_out, temb, ch_out, groups=G, scale_shift_norm=cfg.scale_shift_norm,
                              skip_scaling=cfg.skip_connection_scaling) for i in range(blocks))
        if attention:
            heads = heads_of(ch_out, num_heads=cfg.num_attn_heads, head_channels=cfg.per_head_channels)
            self.attention_layer = attention_block(cfg.attention_type, ch_out, cfg.text_embed_dim, heads=heads, groups=G)
        self.attention = attention

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        if self.resample == "down":
            x = self.conv(x)
        for block in self.blocks:
            x = block(x, emb)
        if self.attention:
            x = self.attention_layer(x, context, mask)
        if self.resample == "up":
            x = self.conv(x)
        return x


class EfficientUNet(_ImagenNet):
    """Imagen's Efficient U-Net for super-resolution (NeMo ``EfficientUNetModel``)."""

    def __init__(self, config: EfficientUNetConfig) -> None:
        super().__init__()
        cfg = self.config = config
        n, E = len(cfg.channel_mult), cfg.embed_dim
        for key in ("num_resblocks", "atnn_enabled_at"):
            if len(getattr(cfg, key)) != n:
                raise ValueError(f"{key} has {len(getattr(cfg, key))} entries for {n} levels (channel_mult)")
        self._init_conditioning(cfg, cfg.text_embed_dim)
        k, temb = cfg.init_conv_kernel_size, 4 * E
        self.init_conv = nn.Conv2d(2 * cfg.channels, E * cfg.channel_mult[0], k, padding=k // 2)
        self.DBlocks, self.UBlocks = nn.ModuleDict(), nn.ModuleDict()
        ch = E * cfg.channel_mult[0]
        for level, mult in enumerate(cfg.channel_mult):
            last = level == n - 1
            opts = dict(blocks=cfg.num_resblocks[level], attention=bool(cfg.atnn_enabled_at[level]))
            self.DBlocks[str(level)] = _Level(ch, mult * E, temb, cfg, resample="" if last else "down", **opts)
            self.UBlocks[str(level)] = _Level(mult * E, ch, temb, cfg, resample="" if last else "up", **opts)
            ch = mult * E
        self.out = nn.Conv2d(E * cfg.channel_mult[0], cfg.channels, 1)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        x = self._with_lowres(x_t, cond)
        emb, context, mask = self._embed(t, cond, x_t.dtype)
        n = len(self.config.channel_mult)
        x = self.init_conv(x)
        feats = []
        for level in range(n):
            x = self.DBlocks[str(level)](x, emb, context, mask)
            feats.append(x)
        for level in reversed(range(n)):
            if level < n - 1:
                x = x + feats[level]  # additive skip (the deepest level has none)
            x = self.UBlocks[str(level)](x, emb, context, mask)
        return self.out(x)


def build_unet(unet_type: str, options: dict[str, Any]) -> ImagenUNet | EfficientUNet:
    """A UNet from NeMo-style keys (``unet_type`` ``base`` or ``sr``); unknown keys are a ValueError."""
    classes = {"base": (BaseUNetConfig, ImagenUNet), "sr": (EfficientUNetConfig, EfficientUNet)}
    if unet_type not in classes:
        raise ValueError(f"unet_type must be 'base' or 'sr', got {unet_type!r}")
    config_cls, net_cls = classes[unet_type]
    known = {a.name for a in attrs.fields(config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {unet_type} UNet key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return net_cls(config_cls(**options))  # type: ignore[arg-type]


def unet_options(net: ImagenUNet | EfficientUNet) -> tuple[str, dict[str, Any]]:
    """``(unet_type, keys)`` that :func:`build_unet` rebuilds ``net`` from (JSON-friendly)."""
    kind = "sr" if isinstance(net, EfficientUNet) else "base"
    return kind, {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(net.config).items()}
