"""NeMo ``.nemo`` ControlNets (``MegatronControlNet``, NeMo's multimodal collection, removed from
NeMo in commit 6aed959726).

The archive holds the whole ``ControlLDM`` (``model_weights.ckpt``: its Stable Diffusion and its
``control_model.*``) and ``model_config.yaml``. NeMo's ``ControlNet`` is the original ``cldm`` one
(``input_hint_block``, ``zero_convs``, ``middle_block_out``) built of NeMo's UNet blocks, so its keys
are the original layout with NeMo's block renames (GroupNorm fused with SiLU, LayerNorms inside the
attention modules), which the SD plugin's :mod:`t2i_plugin_sd.nemo_keymaps` undoes. Only the
ControlNet is read; the base model is the job's ``[model]`` (it may be the same archive).

Of ``model_config.yaml``: ``control_stage_config`` must describe the base UNet's architecture
(heads, transformer depth, levels: read with the SD plugin's ``unet_config`` reader and compared,
a difference is an error naming the field), ``only_mid_control`` is kept (the conditioner applies
it unless its own key says otherwise); ``sd_locked``, ``control_key`` and ``channels_last`` are
training settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from t2i_engine.checkpoint.nemo import is_nemo_archive, read_archive_weights
from t2i_engine.errors import CheckpointError

__all__ = ["is_nemo_archive", "read_nemo_controlnet"]

CONTROL = "control_model."


def _control_keys(sd: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    from t2i_plugin_sd import nemo_keymaps as nk

    stripped = nk.strip_wrappers(sd)
    if not any(k.startswith(CONTROL) for k in stripped):  # an archive of the ControlLDM alone
        stripped = {k.removeprefix("model."): v for k, v in stripped.items()}
    control = {k[len(CONTROL):]: v for k, v in stripped.items() if k.startswith(CONTROL)}
    if not control:
        raise CheckpointError(f"{source}: no control_model.* weights: a NeMo archive, but not of a ControlNet")
    return nk.unet_to_compvis(control, source=source)


def _check_architecture(cfg: Mapping[str, Any], state: Mapping[str, Tensor], base: Any, source: str) -> None:
    """``control_stage_config`` against the base UNet (the encoder copy takes its architecture)."""
    from t2i_plugin_sd.nemo import unet_hints

    control = cfg.get("control_stage_config")
    if not isinstance(control, Mapping):
        raise CheckpointError(f"{source}: model_config.yaml has no control_stage_config (a ControlNet archive has one)")
    hints = unet_hints(control, state, f"{source} (control_stage_config)")
    u = base.config
    attention = [i for i, a in enumerate(u.attention) if a] + [len(u.channels) - 1]  # levels whose heads matter
    if any(hints["unet_heads"][i] != u.heads[i] for i in attention):
        raise CheckpointError(f"{source}: control_stage_config.num_head_channels/num_heads give heads "
                              f"{hints['unet_heads']} but the base UNet has {u.heads}; a ControlNet for another model")
    _, depth = hints["unet_declared"]["depth"]
    if depth[0] != u.transformer_depth[0] or len(set(u.transformer_depth)) != 1:
        raise CheckpointError(f"{source}: control_stage_config.transformer_depth {depth[0]} differs from the base "
                              f"UNet's {u.transformer_depth}")


def read_nemo_controlnet(path: str, base: Any) -> tuple[dict[str, Tensor], bool]:
    """``(state dict in the original layout with control_model.* keys, only_mid_control)`` of a
    NeMo ControlNet archive; ``base`` is the job's core UNet (checked against the yaml)."""
    from t2i_plugin_controlnet.ldm import from_ldm
    from t2i_plugin_sd.nemo import read_config

    cfg = read_config(path)
    control = _control_keys(read_archive_weights(path), path)
    _, _, _, ours = from_ldm({CONTROL + k: v for k, v in control.items()}, base.config, base_weights=None, source=path)
    _check_architecture(cfg, ours, base, path)
    only_mid = cfg.get("only_mid_control", False)
    if not isinstance(only_mid, bool):
        raise CheckpointError(f"{path}: only_mid_control = {only_mid!r}: expected true or false")
    return {CONTROL + k: v for k, v in control.items()}, only_mid
