"""lllyasviel's ControlNet files (the original ``cldm`` layout) <-> our (diffusers) layout.

Read from the keys, nothing fetched: v1.0 ``control_sd15_*.pth`` (the whole ControlLDM: only
``control_model.*`` is taken; its Stable Diffusion weights are the ``[model]``'s business),
v1.1 ``control_v11*.pth/.safetensors`` (``control_model.*`` only), un-prefixed extractions
(``time_embed.0.weight`` ...) and "difference" files (a ``difference`` key: the weights are
deltas to the base UNet's, as sd-webui-controlnet and ComfyUI read them).

The files carry no config: the encoder copy takes the base UNet's architecture (the original
ControlNet is made from its base model's yaml; heads, GroupNorm groups and eps are in no weight),
and the strict load checks every shape against it. The hint encoder's widths come from its shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs
from torch import Tensor

from t2i_engine.errors import CheckpointError
from t2i_engine.nn.unet import UNetConfig
from t2i_plugin_sd import keymaps

__all__ = ["CONTROL_PREFIX", "controlnet_table", "from_ldm", "is_ldm_controlnet", "to_ldm"]

CONTROL_PREFIX = "control_model."
DIFFERENCE_KEY = "difference"
_MARKERS = ("time_embed.0.weight", "input_hint_block.0.weight")


def is_ldm_controlnet(keys: set[str] | list[str]) -> bool:
    """Whether a state dict's keys are a ControlNet in the original layout (prefixed or not)."""
    keys = set(keys)
    return any(CONTROL_PREFIX + m in keys or m in keys for m in _MARKERS)


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def controlnet_table(cfg: UNetConfig, hint_indices: list[int]) -> keymaps.Table:
    """Prefix pairs (ours, theirs) for a ControlNet whose hint encoder has convs at ``hint_indices``."""
    table = [(ours, theirs, inner) for ours, theirs, inner in keymaps.unet_table(cfg)
             if not ours.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))]
    first, *blocks, last = hint_indices
    table += [("controlnet_cond_embedding.conv_in.", f"input_hint_block.{first}.", None),
              ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{last}.", None)]
    table += [(f"controlnet_cond_embedding.blocks.{i}.", f"input_hint_block.{j}.", None) for i, j in enumerate(blocks)]
    n = 1 + len(cfg.channels) * cfg.layers_per_block + len(cfg.channels) - 1  # one per encoder skip
    table += [(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.", None) for i in range(n)]
    table.append(("controlnet_mid_block.", "middle_block_out.0.", None))
    return table


def _control_keys(sd: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    prefixed = {k[len(CONTROL_PREFIX):]: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX)}
    if prefixed:
        return prefixed
    if any(m in sd for m in _MARKERS):
        return {k: v for k, v in sd.items() if k != DIFFERENCE_KEY}
    raise CheckpointError(f"{source}: not a ControlNet file (no {CONTROL_PREFIX}* keys and no {_MARKERS[0]!r})")


def from_ldm(sd: Mapping[str, Tensor], base: UNetConfig, *, base_weights: Mapping[str, Tensor] | None,
             source: str) -> tuple[UNetConfig, tuple[int, ...], int, dict[str, Tensor]]:
    """``(encoder config, hint widths, hint channels, state dict in our layout)`` of an original-layout
    ControlNet made for the UNet ``base`` (``base_weights``: its state dict, for difference files)."""
    control = _control_keys(sd, source)
    hint = _indices(control, r"input_hint_block\.(\d+)\.weight$")
    if len(hint) < 2:
        raise CheckpointError(f"{source}: the hint encoder (input_hint_block.*) has {len(hint)} convolutions; "
                              "a ControlNet has at least two")
    if "input_blocks.0.0.weight" not in control:
        raise CheckpointError(f"{source}: no input_blocks.0.0.weight: not a ControlNet's encoder")
    cfg = attrs.evolve(base, in_channels=int(control["input_blocks.0.0.weight"].shape[1]))
    ours, unknown = keymaps.convert(control, controlnet_table(cfg, hint), forward=False)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys this ControlNet layout does not have "
                              f"(first: {', '.join(sorted(unknown)[:5])}); a ControlNet made for another base model?")
    if DIFFERENCE_KEY in sd:
        if base_weights is None:
            raise CheckpointError(f"{source}: a difference file needs the base UNet's weights")
        ours = {k: v + base_weights[k].to(v.dtype) if k in base_weights else v for k, v in ours.items()}
    widths = (int(ours["controlnet_cond_embedding.conv_in.weight"].shape[0]),
              *(int(ours[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0])
                for i in range(1, len(hint) - 2, 2)))
    channels = int(ours["controlnet_cond_embedding.conv_in.weight"].shape[1])
    return cfg, widths, channels, ours


def to_ldm(state: Mapping[str, Tensor], cfg: UNetConfig, *, widths: int) -> dict[str, Tensor]:
    """Our layout -> the v1.1 layout (``control_model.*``) for a hint encoder of ``widths`` levels."""
    hint = list(range(0, 2 * (2 * (widths - 1) + 1) + 1, 2))
    theirs, unknown = keymaps.convert(state, controlnet_table(cfg, hint), forward=True)
    if unknown:
        raise CheckpointError(f"cannot write {unknown[0]!r} in the original ControlNet layout")
    return {CONTROL_PREFIX + k: v for k, v in theirs.items()}
