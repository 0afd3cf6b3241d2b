"""ControlNet checkpoints -> :class:`~t2i_plugin_controlnet.network.ControlNet`.

diffusers ``ControlNetModel`` folders (``config.json`` and ``diffusion_pytorch_model``
weights, safetensors or a weights-only pickle) and lllyasviel's files
(:mod:`t2i_plugin_controlnet.ldm`). Every field of the config that changes the
computation is read, or the load fails naming it (the UNet fields through the SD plugin's
:func:`~t2i_plugin_sd.diffusers_config.unet_hints`, the ControlNet ones here); the weights load
strictly (a missing or unexpected key is an error naming it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from t2i_engine.checkpoint.io import load_state_dict_strict, read_json_object
from t2i_engine.errors import CheckpointError
from t2i_engine.nn.init import skip_weight_init
from t2i_engine.nn.unet import UNetConfig
from t2i_plugin_controlnet.network import ControlNet, ControlNetConfig
from t2i_plugin_sd.diffusers_config import unet_hints

__all__ = ["LoadedControlNet", "load_controlnet", "load_diffusers_folder", "load_single_file"]

# in the order diffusers' from_pretrained prefers them (the fp16 variant when only it is there)
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")

# ControlNetModel's defaults for the fields that set shapes (a field absent from config.json
# takes its default, as from_pretrained does)
_SHAPE_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "cross_attention_dim": 1280,
    "use_linear_projection": False, "attention_head_dim": 8,
}
_ORDERS = ("rgb", "bgr")


@attrs.frozen
class LoadedControlNet:
    """A loaded network and what its checkpoint says about using it."""

    net: ControlNet
    channel_order: str = "rgb"  # controlnet_conditioning_channel_order
    global_pool: bool = False  # global_pool_conditions (shuffle models)
    only_mid_control: bool = False  # only the middle residual is added (NeMo's only_mid_control)
    source: str = ""


def _own_fields(cfg: dict[str, Any], where: str) -> tuple[int, tuple[int, ...], str, bool]:
    """Pop and check the fields ControlNetModel adds to UNet2DConditionModel's."""
    channels = int(cfg.pop("conditioning_channels", 3))
    widths = cfg.pop("conditioning_embedding_out_channels", (16, 32, 96, 256))
    if widths is None or len(widths) < 1:
        raise CheckpointError(f"{where}: conditioning_embedding_out_channels = {widths!r}: the engine builds "
                              "a hint encoder of one or more levels")
    order = cfg.pop("controlnet_conditioning_channel_order", "rgb")
    if order not in _ORDERS:
        raise CheckpointError(f"{where}: controlnet_conditioning_channel_order = {order!r}: 'rgb' or 'bgr'")
    if "mid_block_type" in cfg and cfg["mid_block_type"] is None:  # diffusers then builds no mid block
        raise CheckpointError(f"{where}: mid_block_type = None: the engine builds UNetMidBlock2DCrossAttn")
    pool = cfg.pop("global_pool_conditions", False)
    if not isinstance(pool, bool):
        raise CheckpointError(f"{where}: global_pool_conditions = {pool!r}: true or false")
    return channels, tuple(int(w) for w in widths), order, pool


def controlnet_config(cfg: Mapping[str, Any], *, where: str) -> tuple[ControlNetConfig, str, bool]:
    """``(architecture, channel order, global pooling)`` from a ``ControlNetModel`` config."""
    if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise CheckpointError(f"{where}: _class_name = {cfg['_class_name']!r}: not a ControlNetModel config")
    rest = {**_SHAPE_DEFAULTS, **cfg}
    channels, widths, order, pool = _own_fields(rest, where)
    hints = unet_hints(rest, where=where)
    declared = {field: value for field, (_, value) in hints["unet_declared"].items()}
    unet = UNetConfig(
        in_channels=declared["in_channels"], channels=declared["channels"], attention=declared["attention"],
        heads=hints["unet_heads"], layers_per_block=declared["layers_per_block"],
        context_dim=declared["context_dim"], transformer_depth=declared["depth"],
        linear_projection=declared["linear_projection"], groups=hints["unet_groups"],
        norm_eps=hints["unet_norm_eps"], upcast_attention=hints["unet_upcast_attention"],
        dropout=hints["unet_dropout"], flip_sin_to_cos=hints["unet_flip_sin_to_cos"],
        freq_shift=hints["unet_freq_shift"])
    if "temb_dim" in declared and declared["temb_dim"] != unet.temb_dim:
        raise CheckpointError(f"{where}: time_embedding_dim = {declared['temb_dim']}: the engine builds "
                              f"4 x block_out_channels[0] ({unet.temb_dim})")
    return ControlNetConfig(unet, hint_channels=channels, hint_widths=widths), order, pool


def _build(arch: ControlNetConfig, state: Mapping[str, Any], *, source: str) -> ControlNet:
    try:
        with skip_weight_init():  # the strict load below replaces every parameter
            net = ControlNet(arch)
    except ValueError as exc:  # e.g. GroupNorm groups that do not divide a level's channels
        raise CheckpointError(f"{source}: cannot build this architecture: {exc}") from exc
    load_state_dict_strict(net, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, source=source)
    return net.eval()


def load_diffusers_folder(path: str) -> LoadedControlNet:
    """A ControlNet from a diffusers ``ControlNetModel`` folder."""
    from t2i_plugin_sd.formats import read_state_dict

    root = Path(path)
    arch, order, pool = controlnet_config(read_json_object(root / "config.json"), where=str(root / "config.json"))
    weights = next((root / n for n in _WEIGHT_FILES if (root / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: no weights file (looked for {', '.join(_WEIGHT_FILES)})")
    return LoadedControlNet(_build(arch, read_state_dict(str(weights)), source=str(weights)),
                            channel_order=order, global_pool=pool, source=str(root))


def load_single_file(path: str, base: Any) -> LoadedControlNet:
    """A ControlNet from one of lllyasviel's files (:mod:`t2i_plugin_controlnet.ldm`) or a NeMo
    ``.nemo`` archive (:mod:`t2i_plugin_controlnet.nemo`) for the
    core UNet ``base``, whose architecture the encoder copy takes."""
    from t2i_plugin_controlnet.ldm import from_ldm
    from t2i_plugin_sd.formats import read_state_dict

    if base is None or not hasattr(getattr(base, "config", None), "channels"):
        raise CheckpointError(f"{path}: an original-layout ControlNet file takes its architecture from the base "
                              "model's UNet; load it with one")
    from t2i_plugin_controlnet.nemo import is_nemo_archive, read_nemo_controlnet

    only_mid = False
    if is_nemo_archive(path):
        raw, only_mid = read_nemo_controlnet(path, base)
    else:
        raw = read_state_dict(path)
    unet, widths, channels, state = from_ldm(raw, base.config, base_weights=base.state_dict(), source=path)
    arch = ControlNetConfig(unet, hint_channels=channels, hint_widths=widths)
    return LoadedControlNet(_build(arch, state, source=path), only_mid_control=only_mid, source=path)


def load_controlnet(path: str, *, base: Any = None) -> LoadedControlNet:
    """A ControlNet (float32, on the CPU, eval mode) from a diffusers ``ControlNetModel`` folder or
    an original-layout file (``.pth``/``.safetensors``, which need ``base``: the model's UNet)."""
    root = Path(path)
    if root.is_dir():
        if not (root / "config.json").is_file():
            raise CheckpointError(f"{path}: a folder without config.json is not a diffusers ControlNetModel folder")
        return load_diffusers_folder(path)
    return load_single_file(path, base)
