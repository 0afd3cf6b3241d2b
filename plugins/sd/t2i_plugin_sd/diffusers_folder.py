"""The diffusers folder format (``model_index.json`` with unet, vae, text_encoder, tokenizer and
scheduler sub-folders), read and written without diffusers itself."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from t2i_engine.checkpoint.io import save_safetensors
from t2i_engine.diffusion.grids import betas_config
from t2i_engine.errors import CheckpointError, ConfigError
from t2i_plugin_sd import keymaps
from t2i_plugin_sd.model import StableDiffusion, Weights
from t2i_plugin_sd.presets import ScheduleConfig
from t2i_plugin_sd.tokenizer_files import read_pad, write_clip_tokenizer

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin")


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


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
        unet_cfg, vae_cfg = _json(root / "unet" / "config.json"), _json(root / "vae" / "config.json")
        text_cfg, sched = _json(root / "text_encoder" / "config.json"), _json(root / "scheduler" / "scheduler_config.json")
        hf = _weights(root / "text_encoder")
        text, unknown = keymaps.hf_clip_to_open_clip(hf)
        if unknown:
            raise CheckpointError(f"{root / 'text_encoder'}: keys not understood: {', '.join(unknown[:10])}")
        # transformers 5 writes CLIPTextModel keys without the "text_model." prefix; keep the style
        hints: dict[str, Any] = {"text_skip": 0,
                                 "hf_text_prefix": "text_model." if any(k.startswith("text_model.") for k in hf) else ""}
        heads = unet_cfg.get("num_attention_heads") or unet_cfg.get("attention_head_dim")
        if heads is not None:
            n = len(unet_cfg.get("block_out_channels", ()))
            hints["unet_heads"] = tuple(heads) if isinstance(heads, list) else (int(heads),) * n
        if "prediction_type" in sched:
            if sched["prediction_type"] not in ("epsilon", "v_prediction"):
                raise CheckpointError(f"{root}/scheduler: prediction_type {sched['prediction_type']!r} is not supported")
            hints["prediction"] = "eps" if sched["prediction_type"] == "epsilon" else "v"
        if sched:
            hints["schedule"] = _schedule(sched, root / "scheduler")
        if "scaling_factor" in vae_cfg:
            hints["scaling_factor"] = float(vae_cfg["scaling_factor"])
        if "hidden_act" in text_cfg:
            hints["text_activation"] = text_cfg["hidden_act"]
        if "num_attention_heads" in text_cfg:
            hints["text_heads"] = int(text_cfg["num_attention_heads"])
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
        text = {k: v for k, v in w.text.items()
                if not k.startswith(tuple(f"transformer.resblocks.{a.text.layers - 1 - i}." for i in range(a.text.skip_last_layers)))}
        files: Mapping[str, tuple[dict[str, Tensor], dict[str, Any], str]] = {
            "unet": (w.unet, _unet_config(model), "diffusion_pytorch_model.safetensors"),
            "vae": (w.vae, _vae_config(model), "diffusion_pytorch_model.safetensors"),
            "text_encoder": (_hf_text(text, model.extras_hints.get("hf_text_prefix", "text_model.")),
                             _text_config(model), "model.safetensors"),
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


def _unet_config(model: StableDiffusion) -> dict[str, Any]:
    u = model.arch.unet
    n = len(u.channels)
    return {
        "_class_name": "UNet2DConditionModel", "in_channels": u.in_channels, "out_channels": u.out_channels,
        "block_out_channels": list(u.channels), "layers_per_block": u.layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention)],
        "cross_attention_dim": u.context_dim, "attention_head_dim": list(u.heads), "norm_num_groups": u.groups,
        "use_linear_projection": u.linear_projection, "transformer_layers_per_block": u.transformer_depth,
        "flip_sin_to_cos": u.flip_sin_to_cos, "freq_shift": u.freq_shift,
        "sample_size": 8 * 2 ** (n - 1) if u.channels[0] < 128 else 64,
    }


def _vae_config(model: StableDiffusion) -> dict[str, Any]:
    v = model.arch.vae
    n = len(v.channels)
    return {
        "_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.in_channels,
        "latent_channels": v.latent_channels, "block_out_channels": list(v.channels),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": v.layers_per_block, "norm_num_groups": v.groups, "scaling_factor": v.scaling_factor,
        "sample_size": 512,
    }


def _text_config(model: StableDiffusion) -> dict[str, Any]:
    t = model.arch.text
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": t.vocab_size,
        "hidden_size": t.width, "intermediate_size": 4 * t.width, "num_hidden_layers": t.layers - t.skip_last_layers,
        "num_attention_heads": t.heads, "max_position_embeddings": t.context_length, "hidden_act": t.activation,
        "layer_norm_eps": 1e-5, "projection_dim": t.width, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 49407 if t.pad == "eos" else 0, "torch_dtype": "float32",
    }


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
