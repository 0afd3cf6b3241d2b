"""Writing a loaded ControlNet as a diffusers ``ControlNetModel`` folder or an lllyasviel v1.1
file (``control_model.*`` keys), atomically and in safetensors (a library call for now: no task
writes ControlNets yet)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from t2i_engine.checkpoint.io import atomic_write_bytes, save_safetensors
from t2i_plugin_controlnet.formats import LoadedControlNet
from t2i_plugin_controlnet.ldm import to_ldm
from t2i_plugin_sd.diffusers_config import unet_config

__all__ = ["diffusers_config", "save_controlnet"]

# UNet2DConditionModel fields ControlNetModel does not take
_UNET_ONLY = ("out_channels", "up_block_types", "sample_size", "dropout")


def diffusers_config(loaded: LoadedControlNet) -> dict[str, Any]:
    """The ``ControlNetModel`` config.json of ``loaded`` (what :func:`~t2i_plugin_controlnet.formats.controlnet_config` reads)."""
    cfg = loaded.net.config
    out = {k: v for k, v in unet_config(cfg.unet).items() if k not in _UNET_ONLY}
    return {**out, "_class_name": "ControlNetModel", "conditioning_channels": cfg.hint_channels,
            "conditioning_embedding_out_channels": list(cfg.hint_widths),
            "controlnet_conditioning_channel_order": loaded.channel_order,
            "global_pool_conditions": loaded.global_pool}


def save_controlnet(loaded: LoadedControlNet, path: str, *, format: Literal["diffusers", "v1.1"] = "diffusers",
                    dtype: torch.dtype | None = None) -> None:
    """Write ``loaded`` to ``path``: a diffusers folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``) or one v1.1-layout ``.safetensors`` file; floats in
    ``dtype`` when given."""
    state = loaded.net.state_dict()
    if format == "v1.1":
        save_safetensors(to_ldm(state, loaded.net.config.unet, widths=len(loaded.net.config.hint_widths)), path,
                         dtype=dtype)
        return
    if format != "diffusers":
        raise ValueError(f"unknown ControlNet format {format!r}; 'diffusers' or 'v1.1'")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, str(root / "diffusion_pytorch_model.safetensors"), dtype=dtype)
    atomic_write_bytes(str(root / "config.json"), json.dumps(diffusers_config(loaded), indent=2).encode())
