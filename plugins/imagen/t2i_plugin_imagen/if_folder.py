"""DeepFloyd IF folders as diffusers saves them: ``unet/``, ``scheduler/``, ``text_encoder/``,
``tokenizer/`` (``IFPipeline`` stage I; ``IFSuperResolutionPipeline`` stage II adds
``image_noising_scheduler/``). Read from disk only, every config key read or refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from t2i_engine.checkpoint.io import load_safetensors, load_state_dict_strict, read_json_object, safe_torch_load
from t2i_engine.errors import CheckpointError
from t2i_plugin_imagen.if_config import if_unet_config
from t2i_plugin_imagen.if_unet import IFUNet

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.fp16.safetensors.index.json")


read_json = read_json_object  # the name this plugin uses


def _read(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    obj = safe_torch_load(str(path))
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return obj


def read_unet_weights(folder: Path) -> dict[str, Tensor]:
    """The UNet state dict of a diffusers ``unet/`` folder (single file, fp16 variant or sharded)."""
    for name in _INDEXES:
        if (folder / name).is_file():
            shards = sorted(set(read_json(folder / name).get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{folder / name} has an empty weight_map")
            return {k: v for shard in shards for k, v in _read(folder / shard).items()}
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return _read(folder / name)
    raise CheckpointError(f"{folder}: no UNet weights (looked for {', '.join(_WEIGHT_FILES + _INDEXES)})")


def _float32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` in float32, converted one tensor at a time (each half-precision tensor of an fp16
    variant is dropped from ``state`` once converted)."""
    return {k: state.pop(k).float() for k in list(state)}


def load_if_unet(folder: str | Path, *, raw_config: dict[str, Any] | None = None) -> IFUNet:
    """A float32 :class:`IFUNet` from a diffusers ``unet/`` folder: architecture from
    ``config.json`` (unsupported keys refused by name; ``raw_config``: that file already read),
    weights loaded strictly. The network is built on the meta device and takes the file's
    tensors as its parameters: no randomly initialised float32 network beside them (for IF-I-XL's
    UNet, about 4.3 B parameters, that was 17 GB more)."""
    folder = Path(folder)
    raw = read_json(folder / "config.json") if raw_config is None else raw_config
    config = if_unet_config(raw, source=str(folder / "config.json"))
    with torch.device("meta"):
        net = IFUNet(config)
    load_state_dict_strict(net, _float32(read_unet_weights(folder)), source=f"{folder} (IF UNet)", assign=True)
    return net.eval()
