"""Reading a diffusers IF ``unet/config.json`` into :class:`~t2i_plugin_imagen.if_unet.IFUNetConfig`.

Every key of ``UNet2DConditionModel``'s config is either read or must hold the one value
:class:`~t2i_plugin_imagen.if_unet.IFUNet` implements; anything else is a CheckpointError naming
the key (never a silently different model).
"""

from __future__ import annotations

from typing import Any

from t2i_engine.errors import CheckpointError
from t2i_plugin_imagen.if_unet import IFUNetConfig

_DOWN = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}
_UP = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}

_FIXED: dict[str, tuple[Any, ...]] = {
    # key: the values IFUNet computes with (diffusers' defaults first)
    "center_input_sample": (False,), "mid_block_type": ("UNetMidBlock2DSimpleCrossAttn",),
    "downsample_padding": (1,), "dropout": (0.0,), "act_fn": ("gelu",), "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim_type": (None, "text_proj"),
    "num_attention_heads": (None,), "dual_cross_attention": (False,), "use_linear_projection": (False,),
    "addition_embed_type": ("text",), "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
    "upcast_attention": (False,), "resnet_time_scale_shift": ("scale_shift",), "time_embedding_type": ("positional",),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "time_embedding_act_fn": (None, "gelu"), "class_embed_type": (None, "timestep"),
    "cross_attention_norm": (None, "group_norm"),
}
_IGNORED = {"sample_size"}  # the trained size: no effect on the computation (any even size runs)


def _one(value: Any, key: str, source: str) -> Any:
    """A per-block list must hold one value (IFUNet has one head size, one text width)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{source}: unet config {key} = {value!r} varies per block; not supported")
        return value[0]
    return value


def if_unet_config(config: dict[str, Any], *, source: str = "unet/config.json") -> IFUNetConfig:
    """The IFUNet architecture a diffusers IF UNet config describes; a key whose value IFUNet
    does not implement is a CheckpointError naming it."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}  # _class_name, _diffusers_version ...
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"{source}: _class_name {config['_class_name']!r} is not an IF UNet2DConditionModel")
    for key, allowed in _FIXED.items():
        value = cfg.get(key, allowed[0])
        if isinstance(value, (list, tuple)) and key == "transformer_layers_per_block":
            value = _one(value, key, source)
        if value not in allowed:
            raise CheckpointError(f"{source}: unet config {key} = {value!r} is not supported by the IF UNet "
                                  f"(supported: {', '.join(map(repr, allowed))})")
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    for key, blocks, known in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        bad = [b for b in blocks if b not in known]
        if bad or not blocks:
            raise CheckpointError(f"{source}: unet config {key} has {bad or blocks!r}; the IF UNet takes "
                                  f"{', '.join(known)}")
    attention = tuple(_DOWN[b] for b in down)
    if tuple(_UP[b] for b in reversed(up)) != attention:
        raise CheckpointError(f"{source}: up_block_types {up!r} do not mirror down_block_types {down!r}")
    channels = tuple(cfg.get("block_out_channels", ()))
    if len(channels) != len(down):
        raise CheckpointError(f"{source}: {len(channels)} block_out_channels for {len(down)} down blocks")
    only_cross = cfg.get("only_cross_attention", False)
    only_cross = _one(only_cross, "only_cross_attention", source)
    mid_only = cfg.get("mid_block_only_cross_attention")
    if mid_only is not None and mid_only != only_cross:
        raise CheckpointError(f"{source}: mid_block_only_cross_attention = {mid_only!r} differs from "
                              f"only_cross_attention = {only_cross!r}; not supported")
    encoder_hid_dim = cfg.get("encoder_hid_dim")
    if encoder_hid_dim is None:
        raise CheckpointError(f"{source}: unet config has no encoder_hid_dim (the T5 width); not an IF UNet")
    known = set(_FIXED) | _IGNORED | {
        "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "up_block_types",
        "only_cross_attention", "block_out_channels", "layers_per_block", "mid_block_scale_factor",
        "norm_num_groups", "norm_eps", "cross_attention_dim", "encoder_hid_dim", "attention_head_dim",
        "resnet_skip_time_act", "resnet_out_scale_factor", "time_embedding_dim", "mid_block_only_cross_attention",
        "addition_embed_type_num_heads"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise CheckpointError(f"{source}: unet config keys {', '.join(unknown)} are not understood by the IF UNet")
    if cfg.get("norm_num_groups", 32) is None:
        raise CheckpointError(f"{source}: norm_num_groups = None (no output norm) is not supported")
    return IFUNetConfig(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
        channels=channels, attention=attention,
        head_dim=int(_one(cfg.get("attention_head_dim", 8), "attention_head_dim", source)),
        layers_per_block=int(_one(cfg.get("layers_per_block", 2), "layers_per_block", source)),
        cross_attention_dim=int(_one(cfg.get("cross_attention_dim", 1280), "cross_attention_dim", source)),
        encoder_hid_dim=int(encoder_hid_dim), pool_heads=int(cfg.get("addition_embed_type_num_heads", 64)),
        groups=int(cfg.get("norm_num_groups", 32)), norm_eps=float(cfg.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)), freq_shift=float(cfg.get("freq_shift", 0)),
        time_embedding_dim=cfg.get("time_embedding_dim"),
        time_embedding_act=cfg.get("time_embedding_act_fn") == "gelu",
        class_embed=cfg.get("class_embed_type") == "timestep",
        resnet_out_scale=float(cfg.get("resnet_out_scale_factor", 1.0)),
        mid_block_scale=float(cfg.get("mid_block_scale_factor", 1.0)),
        skip_time_act=bool(cfg.get("resnet_skip_time_act", False)), only_cross_attention=bool(only_cross),
        cross_attention_norm=cfg.get("cross_attention_norm") == "group_norm",
    )


