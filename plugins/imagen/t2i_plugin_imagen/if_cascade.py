"""DeepFloyd IF folders as ``[[task.stages]]`` of ``imagen-cascade`` / ``imagen-shapes-eval``.

A stage whose ``checkpoint`` is a folder is a diffusers ``IFPipeline`` (stage I) or
``IFSuperResolutionPipeline`` (stage II) folder, sampled as :meth:`IFStage.generate` samples it
(IF's DDPM with the learned-range variance, the scheduler config's thresholding, stage II's
noised low-resolution input), so a cascade of IF folders gives diffusers' images. The keys an IF
stage takes:

* ``sampler``: ``{ name = "ddpm", steps = N }`` only (IF's DDPM; default steps 100 for stage I,
  50 for stage II, as IF's pipelines); another sampler or key is a ConfigError naming it.
* ``guidance``: ``guidance_scale`` (default 7 for stage I, 4 for stage II; <= 1 is off),
  ``dynamic_threshold`` and ``dynamic_threshold_max`` (replacing the scheduler config's
  ``dynamic_thresholding_ratio`` / ``sample_max_value``, IF: 0.95 / 1.5); other guidance keys
  are refused.
* ``noise_level``: stage II only, the augmentation timestep of the low-resolution input (IF: 250).
* ``aug_level``, ``sigma_min``, ``sigma_max`` (Imagen stage files' EDM keys) are refused.

Sizes: stage I samples at its ``unet/config.json`` ``sample_size``; stage II follows any smaller
stage and upsamples it (bilinear) to its ``sample_size``. A stage II folder without
``text_encoder/`` borrows the T5 (model and tokenizer) of the nearest earlier IF stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from t2i_engine.config.structure import structure
from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.errors import ConfigError
from t2i_plugin_imagen.model import IFStage, load_if_stage

#: IF's pipeline defaults per stage: (steps, guidance_scale)
IF_DEFAULTS = {1: (100, 7.0), 2: (50, 4.0)}
IF_NOISE_LEVEL = 250  # IFSuperResolutionPipeline's default
_GUIDANCE_KEYS = ("guidance_scale", "dynamic_threshold", "dynamic_threshold_max")
_EDM_KEYS = {"aug_level": "IF stage II sets noise_level (a DDPM timestep)",
             "sigma_min": "IF stages run the DDPM timesteps of their scheduler config",
             "sigma_max": "IF stages run the DDPM timesteps of their scheduler config"}


@attrs.frozen
class IFStep:
    """One IF folder of a cascade with its sampling keys resolved."""

    stage: IFStage
    steps: int
    guidance: GuidanceConfig
    noise_level: int | None  # stage II's augmentation timestep; None for stage I

    @property
    def image_size(self) -> int:
        """The side this stage samples (its UNet's ``sample_size``)."""
        return int(self.stage.sample_size)  # type: ignore[arg-type]

    @property
    def description(self) -> str:
        """What size-chain errors call this stage."""
        kind = "a base stage" if self.stage.stage == 1 else "super-resolution"
        return f"{self.stage.description} ({kind}, {self.image_size} px)"

    def follows(self, previous: int | None) -> bool:
        """Stage I comes first; stage II follows any smaller stage (its input is upsampled)."""
        if self.stage.stage == 1:
            return previous is None
        return previous is not None and previous < self.image_size

    def sample(self, prompts: Sequence[str], noise: Tensor, *, lowres: Tensor | None,
               generator: torch.Generator) -> Tensor:
        """Images ``(B, 3, S, S)`` in [-1, 1]; ``generator`` draws stage II's augmentation noise,
        then every DDPM step's noise (IF's order)."""
        g = self.guidance
        level = IF_NOISE_LEVEL if self.noise_level is None else self.noise_level
        return self.stage.generate(prompts, noise, steps=self.steps, guidance_scale=g.guidance_scale, lowres=lowres,
                                   noise_level=level, dynamic_threshold=g.dynamic_threshold,
                                   dynamic_threshold_max=g.dynamic_threshold_max, generator=generator).clamp(-1, 1)


def is_if_folder(checkpoint: str) -> bool:
    """Whether a stage's ``checkpoint`` names a folder (an IF stage) rather than a stage file."""
    return Path(checkpoint).is_dir()


def build_if_step(key: str, sc: Any, *, text_from: IFStage | None, device: torch.device) -> IFStep:
    """The IF stage of ``[[task.stages]]`` entry ``sc`` (a StageConfig at ``key``); ``text_from``
    is the nearest earlier IF stage, whose T5 a folder without ``text_encoder/`` borrows."""
    for name, why in _EDM_KEYS.items():
        if getattr(sc, name) is not None:
            raise ConfigError(f"{key}.{name}: not an IF stage's key ({why})")
    folder = Path(sc.checkpoint)
    if not (folder / "text_encoder").is_dir() and text_from is None:
        raise ConfigError(f"{key}.checkpoint: {folder} has no text_encoder/ and no earlier IF stage of this cascade "
                          "lends its T5 (put the IF stage I folder before it, or save the folder with its T5)")
    stage = load_if_stage(folder, text_encoder=text_from.text_encoder if text_from else None).to(device)
    if stage.sample_size is None:
        raise ConfigError(f"{key}.checkpoint: {folder}/unet/config.json has no square sample_size; the cascade "
                          "samples an IF stage at that size")
    steps_default, scale_default = IF_DEFAULTS[stage.stage]
    steps = _if_steps(key, sc.sampler, steps_default)
    guidance = _if_guidance(key, sc.guidance, scale_default)
    return IFStep(stage, steps, guidance, _noise_level(key, sc.noise_level, stage))


@attrs.frozen
class _IFSampler:
    name: str = "ddpm"
    steps: int = attrs.field(default=1, validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)])


def _if_steps(key: str, table: Mapping[str, Any] | None, default: int) -> int:
    """The DDPM steps of an IF stage's ``sampler`` table (``name = "ddpm"`` and ``steps`` only)."""
    table = dict(table or {"name": "ddpm"})
    if table.get("name") != "ddpm":
        raise ConfigError(f"{key}.sampler.name: {table.get('name')!r} cannot sample an IF stage; IF stages sample "
                          "with IF's DDPM (learned-range variance): sampler = { name = \"ddpm\", steps = N }")
    extra = sorted(set(table) - {"name", "steps"})
    if extra:
        raise ConfigError(f"{key}.sampler.{extra[0]}: not a key of an IF stage's DDPM (its only key is steps; the "
                          "timesteps and variance come from the folder's scheduler config)")
    return structure(_IFSampler, {"steps": default, **table}, f"{key}.sampler").steps


def _if_guidance(key: str, table: Mapping[str, Any], default_scale: float) -> GuidanceConfig:
    """An IF stage's guidance keys (``guidance_scale``, ``dynamic_threshold``, ``dynamic_threshold_max``)."""
    extra = sorted(set(table) - set(_GUIDANCE_KEYS))
    if extra and set(extra) <= {f.name for f in attrs.fields(GuidanceConfig)}:
        raise ConfigError(f"{key}.guidance.{extra[0]}: not available for an IF stage (its keys: "
                          f"{', '.join(_GUIDANCE_KEYS)})")
    return structure(GuidanceConfig, {"guidance_scale": default_scale, **table}, f"{key}.guidance")


def _noise_level(key: str, value: int | None, stage: IFStage) -> int | None:
    if value is None:
        return None
    if stage.noising is None:
        raise ConfigError(f"{key}.noise_level: an IF stage I has no low-resolution input to noise")
    if not 0 <= value < stage.noising.num_train_timesteps:
        raise ConfigError(f"{key}.noise_level: must be in [0, {stage.noising.num_train_timesteps}), got {value}")
    return value
