"""The diffusers folder format (``model_index.json`` with unet, vae, text_encoder, tokenizer and
scheduler sub-folders), read and written without diffusers itself."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from t2i_engine.checkpoint.io import read_json_object, save_safetensors
from t2i_engine.diffusion.grids import betas_config
from t2i_engine.errors import CheckpointError, ConfigError
from t2i_plugin_sd import keymaps
from t2i_plugin_sd.diffusers_config import text_config, text_hints, unet_config, unet_hints, vae_config, vae_hints
from t2i_plugin_sd.model import StableDiffusion, Weights
from t2i_plugin_sd.presets import ScheduleConfig
from t2i_plugin_sd.tokenizer_files import read_pad, write_clip_tokenizer

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin")


def _weights(folder: Path) -> dict[str, Tensor]:
    from t2i_plugin_sd.formats import read_state_dict

    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(str(folder / name))
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(_WEIGHT_FILES)})")


class DiffusersFolder:
    """A diffusers ``StableDiffusionPipeline`` folder (safetensors or ``.bin`` weights)."""

    name = "diffusers"

    def detect(self, path: str) -> bool:
        return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()

    def load(self, path: str) -> Weights:
        root = Path(path)
        unet_cfg, vae_cfg, text_cfg = (read_json_object(root / sub / "config.json")
                                       for sub in ("unet", "vae", "text_encoder"))
        sched = read_json_object(root / "scheduler" / "scheduler_config.json", required=False)
        hf = _weights(root / "text_encoder")
        text, unknown = keymaps.hf_clip_to_open_clip(hf)
        if unknown:
            raise CheckpointError(f"{root / 'text_encoder'}: keys not understood: {', '.join(unknown[:10])}")
        # transformers 5 writes CLIPTextModel keys without the "text_model." prefix; keep the style
        hints: dict[str, Any] = {"text_skip": 0,
                                 "hf_text_prefix": "text_model." if any(k.startswith("text_model.") for k in hf) else ""}
        hints |= unet_hints(unet_cfg, where=f"{root / 'unet' / 'config.json'}")
        hints |= vae_hints(vae_cfg, where=f"{root / 'vae' / 'config.json'}")
        hints |= text_hints(text_cfg, where=f"{root / 'text_encoder' / 'config.json'}")
        if "prediction_type" in sched:
            if sched["prediction_type"] not in ("epsilon", "v_prediction"):
                raise CheckpointError(f"{root}/scheduler: prediction_type {sched['prediction_type']!r} is not supported")
            hints["prediction"] = "eps" if sched["prediction_type"] == "epsilon" else "v"
        if sched:
            hints["schedule"] = _schedule(sched, root / "scheduler")
        pad = read_pad(root / "tokenizer")
        if pad is not None:
            hints["text_pad"] = pad
        return Weights(_weights(root / "unet"), _weights(root / "vae"), text, hints, {}, str(root))

    def save(self, model: StableDiffusion, path: str, *, dtype: torch.dtype | None = None) -> None:
        """Write a folder diffusers' ``StableDiffusionPipeline.from_pretrained`` loads (floats in
        ``dtype`` when given).

        A text tower read from its penultimate layer is written without its last layer (as
        diffusers stores SD 2), which gives the same embeddings.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        a, w = model.arch, model.weights()
        if a.text.pad_to_multiple != 1:
            warnings.warn(f"{path}: diffusers cannot express text embeddings zero-padded to a multiple of "
                          f"{a.text.pad_to_multiple} (NeMo's convention); its pipeline will condition on the "
                          "unpadded embeddings", stacklevel=2)
        text = {k: v for k, v in w.text.items()
                if not k.startswith(tuple(f"transformer.resblocks.{a.text.layers - 1 - i}." for i in range(a.text.skip_last_layers)))}
        files: Mapping[str, tuple[dict[str, Tensor], dict[str, Any], str]] = {
            "unet": (w.unet, unet_config(a.unet), "diffusion_pytorch_model.safetensors"),
            "vae": (w.vae, vae_config(a.vae), "diffusion_pytorch_model.safetensors"),
            "text_encoder": (_hf_text(text, model.extras_hints.get("hf_text_prefix", "text_model.")),
                             text_config(a.text), "model.safetensors"),
        }
        for sub, (sd, cfg, fname) in files.items():
            (root / sub).mkdir(exist_ok=True)
            save_safetensors(sd, str(root / sub / fname), dtype=dtype)
            (root / sub / "config.json").write_text(json.dumps(cfg, indent=2))
        write_clip_tokenizer(root / "tokenizer", pad=a.text.pad, max_length=a.text.context_length)
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler_config(model), indent=2))
        (root / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        }, indent=2))


def _hf_text(text: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k.removeprefix("text_model."): v for k, v in keymaps.open_clip_to_hf_clip(text).items()}


_SCHEDULE_FIELDS = ("timestep_spacing", "steps_offset")


def _schedule(sched: dict[str, Any], where: Path) -> ScheduleConfig:
    """The training schedule of a ``scheduler_config.json`` (absent beta keys take its own class's
    defaults, as ``from_pretrained`` would); the raw config rides along for the samplers' grids."""
    try:
        betas = betas_config(sched)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e
    if betas["beta_schedule"] not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise CheckpointError(f"{where}: beta_schedule {betas['beta_schedule']!r} is not supported "
                              "(linear, scaled_linear, squaredcos_cap_v2)")
    return ScheduleConfig(**betas, **{k: sched[k] for k in _SCHEDULE_FIELDS if k in sched},
                          scheduler_config=dict(sched))


def _scheduler_config(model: StableDiffusion) -> dict[str, Any]:
    """The folder's own scheduler config written back (the samplers' grids come from it), else one
    that gives every sampler the grid the engine uses for a model without one."""
    s = model.arch.schedule
    base = dict(s.scheduler_config) if s.scheduler_config is not None else {
        "_class_name": "DDIMScheduler", "timestep_spacing": s.timestep_spacing, "steps_offset": s.steps_offset,
        "clip_sample": False, "set_alpha_to_one": True, "skip_prk_steps": True}
    return {**base, "beta_schedule": s.beta_schedule, "beta_start": s.beta_start, "beta_end": s.beta_end,
            "num_train_timesteps": s.num_train_timesteps, "rescale_betas_zero_snr": s.rescale_betas_zero_snr,
            "prediction_type": "epsilon" if model.prediction == "eps" else "v_prediction"}
