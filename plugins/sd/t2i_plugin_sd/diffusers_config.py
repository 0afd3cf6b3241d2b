"""diffusers / transformers ``config.json`` files <-> the engine's architecture.

Reading: every field of a ``UNet2DConditionModel``, ``AutoencoderKL`` or ``CLIPTextModel`` config
that changes the computation is either read (into :class:`~t2i_plugin_sd.model.Weights` hints) or,
when the engine cannot build it, a :class:`CheckpointError` naming the field. A field absent from
the file takes diffusers' default for it, as ``from_pretrained`` does. Fields the weights' shapes
also tell (channels, layers, attention levels ...) are recorded as *declared* values, which
:func:`t2i_plugin_sd.model.architecture_from` checks against the shapes.

Writing: the configs of a folder diffusers' ``from_pretrained`` loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from t2i_engine.errors import CheckpointError

_META = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size"}

# UNet2DConditionModel fields the engine builds only with this value (None means "absent" too)
_UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
# fields without effect on this architecture (used only with a feature the engine refuses above)
_UNET_INERT = {"addition_embed_type_num_heads"}
_UNET_READ = {
    "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "up_block_types",
    "block_out_channels", "layers_per_block", "dropout", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "upcast_attention", "only_cross_attention", "time_embedding_dim",
}

_VAE_FIXED: dict[str, Any] = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
                              "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
# force_upcast only tells SDXL-style pipelines to decode in float32 under float16
_VAE_INERT = {"force_upcast"}
_VAE_READ = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor"}

_TEXT_ACTIVATIONS = ("quick_gelu", "gelu")


def _fail(where: str, field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {field} = {value!r}: {why}")


def _check_fields(cfg: Mapping[str, Any], where: str, *, read: set[str], fixed: Mapping[str, Any],
                  inert: set[str]) -> None:
    for key, value in cfg.items():
        if key in _META or key in read or key in inert:
            continue
        if key not in fixed:
            raise _fail(where, key, value, "a field this engine does not know; it may change the model, so the "
                                           "load stops rather than build a different one")
        if value is not None and value != fixed[key]:
            raise _fail(where, key, value, f"the engine builds only {fixed[key]!r}")


def _per_level(cfg: Mapping[str, Any], key: str, n: int, default: Any, where: str) -> tuple[Any, ...]:
    value = cfg.get(key, default)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise _fail(where, key, value, f"needs one entry per level ({n})")
        return tuple(value)
    return (value,) * n


def _uniform(cfg: Mapping[str, Any], key: str, n: int, where: str) -> Any:
    values = _per_level(cfg, key, n, None, where)
    if len(set(values)) > 1:
        raise _fail(where, key, list(values), "the engine builds one value for every level")
    return values[0]


def unet_hints(cfg: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Hints from a ``UNet2DConditionModel`` config (``where`` names the file in errors)."""
    _check_fields(cfg, where, read=_UNET_READ, fixed=_UNET_FIXED, inert=_UNET_INERT)
    downs = list(cfg.get("down_block_types", ()))
    n = len(downs) or len(cfg.get("block_out_channels", ()))
    for i, kind in enumerate(downs):
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise _fail(where, f"down_block_types[{i}]", kind, "the engine builds CrossAttnDownBlock2D/DownBlock2D")
    attention = tuple(kind == "CrossAttnDownBlock2D" for kind in downs)
    ups = list(cfg.get("up_block_types", ()))
    expected_ups = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if ups and ups != expected_ups:
        raise _fail(where, "up_block_types", ups, f"must mirror down_block_types ({expected_ups})")
    if any(_per_level(cfg, "only_cross_attention", n, False, where)):
        raise _fail(where, "only_cross_attention", cfg["only_cross_attention"], "the engine builds self-attention too")
    # diffusers' legacy naming: attention_head_dim holds the number of heads when
    # num_attention_heads is absent (UNet2DConditionModel.__init__ does the same)
    heads_key = "num_attention_heads" if cfg.get("num_attention_heads") is not None else "attention_head_dim"
    heads = _per_level(cfg, heads_key, n, 8, where)
    depth = _per_level(cfg, "transformer_layers_per_block", n, 1, where)
    if any(not isinstance(d, int) for d in depth):
        raise _fail(where, "transformer_layers_per_block", cfg["transformer_layers_per_block"],
                    "the engine builds one depth per level")
    hints: dict[str, Any] = {
        "unet_heads": tuple(int(h) for h in heads),
        "unet_groups": cfg.get("norm_num_groups", 32), "unet_norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "unet_upcast_attention": bool(cfg.get("upcast_attention", False)),
        "unet_flip_sin_to_cos": bool(cfg.get("flip_sin_to_cos", True)),
        "unet_freq_shift": float(cfg.get("freq_shift", 0)), "unet_dropout": float(cfg.get("dropout", 0.0)),
    }
    if hints["unet_groups"] is None:
        raise _fail(where, "norm_num_groups", None, "the engine builds GroupNorm layers")
    declared: dict[str, tuple[str, Any]] = {"depth": ("transformer_layers_per_block", depth)}
    if downs:
        declared["attention"] = ("down_block_types", attention)
    for field, key in (("channels", "block_out_channels"), ("in_channels", "in_channels"),
                       ("out_channels", "out_channels")):
        if key in cfg:
            declared[field] = (key, tuple(cfg[key]) if field == "channels" else int(cfg[key]))
    if "layers_per_block" in cfg:
        declared["layers_per_block"] = ("layers_per_block", int(_uniform(cfg, "layers_per_block", n, where)))
    if "cross_attention_dim" in cfg:
        declared["context_dim"] = ("cross_attention_dim", int(_uniform(cfg, "cross_attention_dim", n, where)))
    if "use_linear_projection" in cfg:
        declared["linear_projection"] = ("use_linear_projection", bool(cfg["use_linear_projection"]))
    if cfg.get("time_embedding_dim") is not None:
        declared["temb_dim"] = ("time_embedding_dim", int(cfg["time_embedding_dim"]))
    hints["unet_declared"] = declared
    return hints


def vae_hints(cfg: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Hints from an ``AutoencoderKL`` config."""
    _check_fields(cfg, where, read=_VAE_READ, fixed=_VAE_FIXED, inert=_VAE_INERT)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(k != kind for k in cfg.get(key, ())):
            raise _fail(where, key, cfg[key], f"the engine builds {kind} levels")
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise _fail(where, "norm_num_groups", None, "the engine builds GroupNorm layers")
    hints: dict[str, Any] = {"vae_groups": int(groups), "scaling_factor": float(cfg.get("scaling_factor", 0.18215))}
    declared: dict[str, tuple[str, Any]] = {}
    for field, key in (("channels", "block_out_channels"), ("in_channels", "in_channels"),
                       ("out_channels", "out_channels"), ("latent_channels", "latent_channels"),
                       ("layers_per_block", "layers_per_block")):
        if key in cfg:
            declared[field] = (key, tuple(cfg[key]) if field == "channels" else int(cfg[key]))
    hints["vae_declared"] = declared
    return hints


def text_hints(cfg: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Hints from a transformers ``CLIPTextConfig`` (``CLIPTextModel``'s ``config.json``).

    Width, layers, MLP width, vocabulary and positions come from the weights; the file supplies
    the heads, activation and LayerNorm eps (transformers' defaults when absent).
    """
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in _TEXT_ACTIVATIONS:
        raise _fail(where, "hidden_act", act, f"the engine builds {' or '.join(_TEXT_ACTIVATIONS)}")
    hints: dict[str, Any] = {"text_activation": act, "text_heads": int(cfg.get("num_attention_heads", 8)),
                             "text_layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-5))}
    declared: dict[str, tuple[str, Any]] = {}
    for field, key in (("width", "hidden_size"), ("mlp_width", "intermediate_size"),
                       ("vocab_size", "vocab_size"), ("context_length", "max_position_embeddings")):
        if key in cfg:
            declared[field] = (key, int(cfg[key]))
    hints["text_declared"] = declared
    return hints


def unet_config(u: Any) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config for our :class:`~t2i_engine.nn.UNetConfig` ``u``."""
    return {
        "_class_name": "UNet2DConditionModel", "in_channels": u.in_channels, "out_channels": u.out_channels,
        "block_out_channels": list(u.channels), "layers_per_block": u.layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention)],
        "cross_attention_dim": u.context_dim, "attention_head_dim": list(u.heads), "norm_num_groups": u.groups,
        "norm_eps": u.norm_eps, "use_linear_projection": u.linear_projection,
        "transformer_layers_per_block": list(u.transformer_depth), "upcast_attention": u.upcast_attention,
        "flip_sin_to_cos": u.flip_sin_to_cos, "freq_shift": u.freq_shift, "dropout": u.dropout,
        "sample_size": 8 * 2 ** (len(u.channels) - 1) if u.channels[0] < 128 else 64,
    }


def vae_config(v: Any) -> dict[str, Any]:
    """An ``AutoencoderKL`` config for our :class:`~t2i_plugin_sd.autoencoder.AutoencoderConfig`."""
    n = len(v.channels)
    return {
        "_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.out_channels,
        "latent_channels": v.latent_channels, "block_out_channels": list(v.channels),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": v.layers_per_block, "norm_num_groups": v.groups, "scaling_factor": v.scaling_factor,
        "sample_size": 512,
    }


def text_config(t: Any) -> dict[str, Any]:
    """A ``CLIPTextConfig`` for our :class:`~t2i_plugin_sd.text_encoder.TextEncoderConfig` (the
    layers a penultimate-layer read-out skips are left out, as diffusers stores SD 2)."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": t.vocab_size,
        "hidden_size": t.width, "intermediate_size": t.mlp_width or 4 * t.width,
        "num_hidden_layers": t.layers - t.skip_last_layers, "num_attention_heads": t.heads,
        "max_position_embeddings": t.context_length, "hidden_act": t.activation, "layer_norm_eps": t.layer_norm_eps,
        "projection_dim": t.width, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 49407 if t.pad == "eos" else 0, "torch_dtype": "float32",
    }
