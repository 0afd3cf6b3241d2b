"""Read architecture from weights (our layout): what the shapes tell.

What shapes cannot tell (attention heads, GroupNorm groups, eps ...) comes from the checkpoint's
own files (hints), the ``[model]`` keys or an explicitly chosen preset; for the two released
Stable Diffusion architectures the heads are known by their shapes (:data:`KNOWN_UNET_HEADS`).
Anything else is a :class:`CheckpointError` that says which key to set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs
from torch import Tensor

from t2i_engine.errors import CheckpointError
from t2i_engine.nn import UNetConfig
from t2i_plugin_sd.autoencoder import AutoencoderConfig
from t2i_plugin_sd.text_encoder import TextEncoderConfig

KNOWN_UNET_HEADS: dict[tuple[tuple[int, ...], int], tuple[int, ...]] = {
    ((320, 640, 1280, 1280), 768): (8, 8, 8, 8),  # SD 1.x: 8 heads everywhere
    ((320, 640, 1280, 1280), 1024): (5, 10, 20, 20),  # SD 2.x: head dim 64
}
"""(UNet channels, context width) of released architectures -> their attention heads per level."""

KNOWN_TEXT_HEADS: dict[int, int] = {768: 12, 1024: 16, 1280: 20}
"""Text width -> heads of the released CLIP towers (ViT-L/14, OpenCLIP ViT-H/14, ViT-bigG/14)."""


def _indices(keys: Mapping[str, Tensor], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


def _count(keys: Mapping[str, Tensor], pattern: str) -> int:
    return len(_indices(keys, pattern))


def _need(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"{what} weights lack the key {key!r}; the checkpoint is incomplete or not Stable Diffusion")
    return sd[key]


def _depths(sd: Mapping[str, Tensor], attention: tuple[bool, ...]) -> tuple[int, ...]:
    """Transformer blocks per level (levels without attention take the mid block's, or 1)."""
    mid = _count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    n = len(attention)
    return tuple(_count(sd, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") if attention[i]
                 else (mid if i == n - 1 else 1) for i in range(n))


def infer_unet(sd: Mapping[str, Tensor], base: UNetConfig, *, heads: tuple[int, ...] | None = None,
               base_heads: bool = False) -> UNetConfig:
    """UNet architecture from its state dict.

    ``heads`` (from the checkpoint's files or ``[model] unet_heads``) wins; else the preset's when
    ``base_heads`` (a preset the user chose) and its channels match; else a released
    architecture's (:data:`KNOWN_UNET_HEADS`); else a CheckpointError saying what to set.
    """
    n = _count(sd, r"down_blocks\.(\d+)\.")
    if n == 0:
        raise CheckpointError("UNet weights have no down_blocks.* keys")
    channels = tuple(int(_need(sd, f"down_blocks.{i}.resnets.0.conv1.weight", "UNet").shape[0]) for i in range(n))
    attention = tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(n))
    proj = _need(sd, "mid_block.attentions.0.proj_in.weight", "UNet")
    context = int(_need(sd, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "UNet").shape[1])
    shapes = attrs.evolve(
        base, in_channels=int(_need(sd, "conv_in.weight", "UNet").shape[1]),
        out_channels=int(_need(sd, "conv_out.weight", "UNet").shape[0]), channels=channels, attention=attention,
        heads=(1,) * n, layers_per_block=_count(sd, r"down_blocks\.0\.resnets\.(\d+)\."), context_dim=context,
        transformer_depth=_depths(sd, attention), linear_projection=proj.ndim == 2)
    if heads is None:
        if base_heads and base.channels == channels:
            heads = base.heads
        elif (channels, context) in KNOWN_UNET_HEADS:
            heads = KNOWN_UNET_HEADS[(channels, context)]
        else:
            raise CheckpointError(
                f"the UNet's attention heads are not in its weights and this checkpoint does not record them "
                f"(channels {list(channels)}, context {context}); set [model] unet_heads = [...] (one per level) "
                "or a preset")
    if len(heads) != n:
        raise CheckpointError(f"{len(heads)} attention-head counts for a UNet of {n} levels")
    return attrs.evolve(shapes, heads=tuple(heads))


def infer_vae(sd: Mapping[str, Tensor], base: AutoencoderConfig) -> AutoencoderConfig:
    """Autoencoder architecture from its state dict."""
    n = _count(sd, r"encoder\.down_blocks\.(\d+)\.")
    if n == 0:
        raise CheckpointError("autoencoder weights have no encoder.down_blocks.* keys")
    channels = tuple(int(_need(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "autoencoder").shape[0])
                     for i in range(n))
    return attrs.evolve(base, in_channels=int(_need(sd, "encoder.conv_in.weight", "autoencoder").shape[1]),
                        out_channels=int(_need(sd, "decoder.conv_out.weight", "autoencoder").shape[0]),
                        latent_channels=int(_need(sd, "post_quant_conv.weight", "autoencoder").shape[0]),
                        channels=channels, layers_per_block=_count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))


def infer_text(sd: Mapping[str, Tensor], base: TextEncoderConfig, *, heads: int | None = None,
               base_heads: bool = False) -> TextEncoderConfig:
    """Text tower architecture from its open_clip state dict; heads as :func:`infer_unet` decides
    them (:data:`KNOWN_TEXT_HEADS` for the released widths)."""
    emb = _need(sd, "token_embedding.weight", "text encoder")
    width = int(emb.shape[1])
    if heads is None:
        if base_heads and base.width == width:
            heads = base.heads
        elif width in KNOWN_TEXT_HEADS:
            heads = KNOWN_TEXT_HEADS[width]
        else:
            raise CheckpointError(f"the text encoder's attention heads are not in its weights and this checkpoint "
                                  f"does not record them (width {width}); set [model] text_heads or a preset")
    mlp = int(_need(sd, "transformer.resblocks.0.mlp.c_fc.weight", "text encoder").shape[0])
    return attrs.evolve(base, width=width, vocab_size=int(emb.shape[0]), heads=heads,
                        mlp_width=None if mlp == 4 * width else mlp,
                        layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
                        context_length=int(_need(sd, "positional_embedding", "text encoder").shape[0]))
