"""Checkpoint formats: diffusers folders, single-file CompVis/A1111 checkpoints, NeMo archives.

Each format has ``detect(path) -> bool`` (from the files and keys themselves), ``load(path) ->
Weights`` and, where the engine can write it, ``save(model, path)``. :func:`detect_format` picks
the one format that claims a path and explains when none or several do. Nothing is fetched from
a network; pickles load only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import struct
import tarfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch
import yaml
from torch import Tensor

from t2i_engine.checkpoint.io import (
    atomic_write_bytes, load_safetensors, read_bytes, safe_torch_load, save_safetensors,
)
from t2i_engine.errors import CheckpointError
from t2i_engine.nn import UNetConfig
from t2i_plugin_sd import keymaps
from t2i_plugin_sd.ldm_config import (
    ARCH_METADATA_KEY, architecture_metadata, hints_from_metadata, inexpressible, ldm_yaml, ldm_yaml_hints,
    read_yaml_config,
)
from t2i_plugin_sd.model import StableDiffusion, Weights, architecture_hints
from t2i_plugin_sd.presets import Architecture

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
HF_TEXT_PREFIX = "cond_stage_model.transformer."
OPENCLIP_TEXT_PREFIX = "cond_stage_model.model."


class CheckpointFormat(Protocol):
    """What every format offers (``save`` only where the engine can write the format)."""

    name: str

    def detect(self, path: str) -> bool:
        """True when ``path`` is in this format (decided from its files and keys)."""
        ...

    def load(self, path: str) -> Weights:
        """Read ``path`` into our layout."""
        ...


# --- reading state dicts ---------------------------------------------------------------------


def safetensors_keys(path: str) -> list[str] | None:
    """Tensor names from a safetensors header, or None when ``path`` is not safetensors."""
    header = _safetensors_header(path)
    return None if header is None else [k for k in header if k != "__metadata__"]


def safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty when it has none)."""
    meta = (_safetensors_header(path) or {}).get("__metadata__")
    return dict(meta) if isinstance(meta, dict) else {}


def _safetensors_header(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A flat state dict from ``.safetensors`` or a weights-only pickle (``state_dict`` unwrapped)."""
    if safetensors_keys(path) is not None:
        return load_safetensors(path)
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return dict(obj)


def _pick(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# --- single file (CompVis / A1111) -----------------------------------------------------------


def _unet_skeleton(compvis: Mapping[str, Tensor]) -> UNetConfig:
    """The level structure of a CompVis UNet, enough to build its key table."""
    downs = sorted({int(k.split(".")[1]) for k in compvis if k.startswith("input_blocks.") and ".0.op." in k})
    outputs = {int(k.split(".")[1]) for k in compvis if k.startswith("output_blocks.")}
    n = len(downs) + 1
    if not outputs or len(outputs) % n:
        raise CheckpointError("the UNet weights do not have the CompVis input/output block structure")
    layers = len(outputs) // n - 1
    attention = [f"input_blocks.{1 + i * (layers + 1)}.1.proj_in.weight" in compvis for i in range(n)]
    return UNetConfig(channels=(1,) * n, attention=attention, heads=(1,) * n, layers_per_block=layers)


def split_single_file(sd: Mapping[str, Tensor], *, source: str) -> Weights:
    """Split a CompVis-layout state dict into our layout (the rest goes to ``extras``)."""
    unet_c, vae_c = _pick(sd, UNET_PREFIX), _pick(sd, VAE_PREFIX)
    if not unet_c:
        raise CheckpointError(f"{source}: no UNet weights (keys starting with {UNET_PREFIX!r})")
    if not vae_c:
        raise CheckpointError(f"{source}: no autoencoder weights (keys starting with {VAE_PREFIX!r})")
    unet, u_unknown = keymaps.convert(unet_c, keymaps.unet_table(_unet_skeleton(unet_c)), forward=False)
    levels = len({k.split(".")[2] for k in vae_c if k.startswith("encoder.down.")})
    layers = len({k.split(".")[4] for k in vae_c if k.startswith("encoder.down.0.block.")})
    vae, v_unknown = keymaps.convert(vae_c, keymaps.vae_table(levels, layers), forward=False)
    hints: dict[str, Any] = {}
    hf = _pick(sd, HF_TEXT_PREFIX)
    if hf:
        text, t_unknown = keymaps.hf_clip_to_open_clip({k.removeprefix("text_model."): v for k, v in hf.items()})
        t_unknown = [HF_TEXT_PREFIX + k for k in t_unknown]
        hints.update(text_activation="quick_gelu", text_skip=0, text_pad="eos")
        used = {HF_TEXT_PREFIX + k for k in hf}
    else:
        text = _pick(sd, OPENCLIP_TEXT_PREFIX)
        if not text:
            raise CheckpointError(f"{source}: no text-encoder weights ({HF_TEXT_PREFIX!r} or {OPENCLIP_TEXT_PREFIX!r})")
        text_own = {"token_embedding.weight", "positional_embedding"}
        t_unknown = [OPENCLIP_TEXT_PREFIX + k for k in text if not (k in text_own or k.startswith(("transformer.", "ln_final.")))]
        text = {k: v for k, v in text.items() if OPENCLIP_TEXT_PREFIX + k not in t_unknown}
        hints.update(text_activation="gelu", text_skip=1, text_pad="zero")
        used = {OPENCLIP_TEXT_PREFIX + k for k in text}
    used |= {UNET_PREFIX + k for k in unet_c if k not in u_unknown} | {VAE_PREFIX + k for k in vae_c if k not in v_unknown}
    extras = {k: v for k, v in sd.items() if k not in used}
    return Weights(unet, vae, text, hints, extras, source)


def join_single_file(weights: Weights) -> dict[str, Tensor]:
    """Our layout -> one CompVis-layout state dict (``extras`` written back unchanged)."""
    unet_cfg = _unet_skeleton_from_ours(weights.unet)
    unet, _ = keymaps.convert(weights.unet, keymaps.unet_table(unet_cfg), forward=True)
    levels = len({k.split(".")[2] for k in weights.vae if k.startswith("encoder.down_blocks.")})
    layers = len({k.split(".")[4] for k in weights.vae if k.startswith("encoder.down_blocks.0.resnets.")})
    vae, _ = keymaps.convert(weights.vae, keymaps.vae_table(levels, layers), forward=True)
    out = {UNET_PREFIX + k: v for k, v in unet.items()} | {VAE_PREFIX + k: v for k, v in vae.items()}
    activation, skip = weights.hints.get("text_activation", "quick_gelu"), weights.hints.get("text_skip", 1)
    if activation == "quick_gelu":
        out |= {HF_TEXT_PREFIX + k: v for k, v in keymaps.open_clip_to_hf_clip(weights.text).items()}
    else:
        text = pad_identity_layer(weights.text) if pads_identity_layer(activation, skip) else weights.text
        out |= {OPENCLIP_TEXT_PREFIX + k: v for k, v in text.items()}
    return out | weights.extras


def pads_identity_layer(activation: str, skip_last_layers: int) -> bool:
    """Whether a single-file export appends an identity layer to the text tower: an open_clip
    layout tower read from its last layer (see :func:`pad_identity_layer`)."""
    return activation != "quick_gelu" and skip_last_layers == 0


def single_file_architecture(arch: Architecture) -> Architecture:
    """``arch`` as a single-file export stores it (with the padded identity text layer)."""
    t = arch.text
    if not pads_identity_layer(t.activation, t.skip_last_layers):
        return arch
    return attrs.evolve(arch, text=attrs.evolve(t, layers=t.layers + 1, skip_last_layers=1))


def pad_identity_layer(text: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip text tower with one zeroed residual block appended.

    Single files in the open_clip layout are read from their penultimate layer (SD 2, and A1111
    the same way). A tower that is read from its last layer - diffusers' SD 2 text encoder, which
    stores 23 of the 24 layers - gets a block whose output projections are zero, so it adds
    nothing: read from the penultimate layer, the padded tower gives the same embeddings.
    """
    import torch

    n = len({k.split(".")[2] for k in text if k.startswith("transformer.resblocks.")})
    last = f"transformer.resblocks.{n - 1}."
    pad = {f"transformer.resblocks.{n}." + k[len(last):]: torch.zeros_like(v) for k, v in text.items()
           if k.startswith(last)}
    return {**text, **pad}


def _unet_skeleton_from_ours(sd: Mapping[str, Tensor]) -> UNetConfig:
    n = len({k.split(".")[1] for k in sd if k.startswith("down_blocks.")})
    layers = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.resnets.")})
    attention = [f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(n)]
    return UNetConfig(channels=(1,) * n, attention=attention, heads=(1,) * n, layers_per_block=layers)


class SingleFile:
    """One ``.safetensors`` (or weights-only ``.ckpt``) file in the CompVis/A1111 layout.

    Architecture: the weights' shapes; then the engine's own record in the safetensors metadata
    (:data:`~t2i_plugin_sd.ldm_config.ARCH_METADATA_KEY`, written by :meth:`save`); then a
    ``.yaml`` beside it with the same stem (the latent-diffusion inference config: prediction
    type, scale factor, schedule, heads, text read-out), which wins where both speak.
    """

    name = "single-file"

    def detect(self, path: str) -> bool:
        p = Path(path)
        if not p.is_file():
            return False
        keys = safetensors_keys(path)
        if keys is None:
            if p.suffix not in (".ckpt", ".pt", ".pth") or tarfile.is_tarfile(path):
                return False
            keys = list(read_state_dict(path))
        return any(k.startswith(UNET_PREFIX) for k in keys)

    def load(self, path: str) -> Weights:
        weights = split_single_file(read_state_dict(path), source=path)
        record = safetensors_metadata(path).get(ARCH_METADATA_KEY)
        if record is not None:
            weights.hints.update(hints_from_metadata(record, where=path))
        side = Path(path).with_suffix(".yaml")
        if side.is_file():
            weights.hints.update(ldm_yaml_hints(read_yaml_config(side.read_bytes(), source=str(side)), where=str(side)))
        return weights

    def save(self, model: StableDiffusion, path: str, *, dtype: torch.dtype | None = None) -> None:
        """Write one safetensors file in the CompVis layout (floats in ``dtype`` when given), with
        the engine's architecture record in its metadata, and beside it the latent-diffusion
        ``.yaml`` CompVis/A1111 tools and diffusers' ``from_single_file(original_config=...)`` read.

        Fields that yaml cannot express (:func:`~t2i_plugin_sd.ldm_config.inexpressible`) are
        named in a warning: the engine reloads them from the metadata, other tools would not.
        """
        weights, arch = model.weights(), single_file_architecture(model.arch)
        meta = {"prediction": model.prediction, "format": "compvis",
                ARCH_METADATA_KEY: architecture_metadata({"schedule": arch.schedule, **architecture_hints(arch)})}
        lost = inexpressible(arch)
        if lost:
            warnings.warn(f"{path}: the latent-diffusion yaml cannot express {', '.join(lost)}; the engine reads "
                          "them back from the file's metadata, other tools will build a different model "
                          "(export a diffusers folder for them)", stacklevel=2)
        save_safetensors(join_single_file(weights), path, dtype=dtype, metadata=meta)
        side = path.removesuffix(Path(path).suffix) + ".yaml"
        atomic_write_bytes(side, yaml.safe_dump(ldm_yaml(arch), sort_keys=False).encode())


from t2i_plugin_sd.diffusers_folder import DiffusersFolder  # noqa: E402
from t2i_plugin_sd.nemo import NemoArchive  # noqa: E402

CHECKPOINT_FORMATS: dict[str, Any] = {"diffusers": DiffusersFolder, "single-file": SingleFile, "nemo": NemoArchive}
"""Format name -> factory (``factory()`` gives the format object)."""


def detect_format(path: str) -> CheckpointFormat:
    """The one format that claims ``path``; a CheckpointError when none or several do."""
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    found = [fmt for fmt in (factory() for factory in CHECKPOINT_FORMATS.values()) if fmt.detect(path)]
    if not found:
        raise CheckpointError(
            f"{path} matches no Stable Diffusion checkpoint format (looked for: a diffusers folder with "
            f"model_index.json, a single file with {UNET_PREFIX}* keys, a .nemo tar with model_weights.ckpt)")
    if len(found) > 1:
        raise CheckpointError(f"{path} is ambiguous: it matches {', '.join(f.name for f in found)}; "
                              "set [model] format to choose")
    return found[0]


def load_checkpoint(path: str, *, format: str | None = None) -> Weights:
    """Read a checkpoint in the named format, or the detected one."""
    if format is not None:
        if format not in CHECKPOINT_FORMATS:
            raise CheckpointError(f"unknown checkpoint format {format!r}; known: {', '.join(CHECKPOINT_FORMATS)}")
        return CHECKPOINT_FORMATS[format]().load(path)
    return detect_format(path).load(path)


__all__ = ["CHECKPOINT_FORMATS", "NemoArchive", "SingleFile", "detect_format", "load_checkpoint", "pad_identity_layer",
           "read_bytes"]
