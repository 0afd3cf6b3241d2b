"""Read architecture from weights (our layout): what shapes tell, the preset fills the rest."""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs
from torch import Tensor

from t2i_engine.errors import CheckpointError
from t2i_engine.nn import UNetConfig
from t2i_plugin_sd.autoencoder import AutoencoderConfig
from t2i_plugin_sd.text_encoder import TextEncoderConfig


def _count(keys: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in keys if (m := rx.match(k))}
    return len(found)


def _need(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"{what} weights lack the key {key!r}; the checkpoint is incomplete or not Stable Diffusion")
    return sd[key]


def infer_unet(sd: Mapping[str, Tensor], base: UNetConfig, *, heads: tuple[int, ...] | None = None) -> UNetConfig:
    """UNet architecture from its state dict; ``heads`` (or the SD rule) gives what shapes cannot."""
    n = _count(sd, r"down_blocks\.(\d+)\.")
    if n == 0:
        raise CheckpointError("UNet weights have no down_blocks.* keys")
    channels = tuple(int(_need(sd, f"down_blocks.{i}.resnets.0.conv1.weight", "UNet").shape[0]) for i in range(n))
    attention = tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(n))
    proj = _need(sd, "mid_block.attentions.0.proj_in.weight", "UNet")
    context = int(_need(sd, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "UNet").shape[1])
    if heads is None:
        if base.channels == channels:
            heads = base.heads
        elif context == 768:  # SD 1.x: 8 heads everywhere
            heads = (8,) * n
        else:  # SD 2.x: head dim 64
            heads = tuple(max(1, c // 64) for c in channels)
    return attrs.evolve(
        base, in_channels=int(_need(sd, "conv_in.weight", "UNet").shape[1]),
        out_channels=int(_need(sd, "conv_out.weight", "UNet").shape[0]), channels=channels, attention=attention,
        heads=heads, layers_per_block=_count(sd, r"down_blocks\.0\.resnets\.(\d+)\."), context_dim=context,
        transformer_depth=_count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."),
        linear_projection=proj.ndim == 2)


def infer_vae(sd: Mapping[str, Tensor], base: AutoencoderConfig) -> AutoencoderConfig:
    """Autoencoder architecture from its state dict."""
    n = _count(sd, r"encoder\.down_blocks\.(\d+)\.")
    if n == 0:
        raise CheckpointError("autoencoder weights have no encoder.down_blocks.* keys")
    channels = tuple(int(_need(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "autoencoder").shape[0])
                     for i in range(n))
    return attrs.evolve(base, in_channels=int(_need(sd, "encoder.conv_in.weight", "autoencoder").shape[1]),
                        latent_channels=int(_need(sd, "post_quant_conv.weight", "autoencoder").shape[0]),
                        channels=channels, layers_per_block=_count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))


def infer_text(sd: Mapping[str, Tensor], base: TextEncoderConfig, *, heads: int | None = None) -> TextEncoderConfig:
    """Text tower architecture from its open_clip state dict."""
    emb = _need(sd, "token_embedding.weight", "text encoder")
    width = int(emb.shape[1])
    if heads is None:
        heads = base.heads if base.width == width else max(1, width // 64)
    return attrs.evolve(base, width=width, vocab_size=int(emb.shape[0]), heads=heads,
                        layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
                        context_length=int(_need(sd, "positional_embedding", "text encoder").shape[0]))
