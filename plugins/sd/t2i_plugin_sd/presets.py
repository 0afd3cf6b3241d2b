"""Named architectures of Stable Diffusion (the ``[model] preset`` key).

A preset fixes what the weights cannot tell: attention heads, text-tower read-out and padding,
the prediction type and the training schedule. Shapes found in a checkpoint override it.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from t2i_engine.interfaces import Prediction
from t2i_engine.nn import UNetConfig
from t2i_plugin_sd.autoencoder import AutoencoderConfig
from t2i_plugin_sd.text_encoder import TextEncoderConfig

PresetName = Literal["sd-1", "sd-2", "sd-2-v", "tiny", "tiny-v", "tiny-2", "shapes-64"]


@attrs.frozen
class ScheduleConfig:
    """The DDPM training schedule (diffusers ``scheduler_config.json`` names)."""

    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"  # without scheduler_config
    steps_offset: int = 1  # without scheduler_config
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023 zero terminal SNR
    # the raw scheduler_config.json of a diffusers folder: samplers take their default grids from
    # it as diffusers' <Scheduler>.from_config would (t2i_engine.diffusion.grids)
    scheduler_config: dict[str, Any] | None = attrs.field(default=None, eq=False)


@attrs.frozen
class Architecture:
    """Everything needed to build a Stable Diffusion model with random weights."""

    unet: UNetConfig
    vae: AutoencoderConfig
    text: TextEncoderConfig
    schedule: ScheduleConfig = ScheduleConfig()

    @property
    def prediction(self) -> Prediction:
        """What the UNet predicts."""
        return self.unet.prediction


_SD1 = Architecture(UNetConfig(), AutoencoderConfig(), TextEncoderConfig())
_SD2_UNET = UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, linear_projection=True)
_SD2_TEXT = TextEncoderConfig(width=1024, layers=24, heads=16, activation="gelu", skip_last_layers=1, pad="zero")
_TINY_UNET = UNetConfig(channels=(32, 64), attention=(True, False), heads=(2, 2), layers_per_block=1, context_dim=32)
_TINY_VAE = AutoencoderConfig(channels=(32, 32), layers_per_block=1)
_TINY_TEXT = TextEncoderConfig(width=32, layers=2, heads=4)

PRESETS: dict[str, Architecture] = {
    "sd-1": _SD1,
    "sd-2": Architecture(_SD2_UNET, AutoencoderConfig(), _SD2_TEXT),
    "sd-2-v": Architecture(attrs.evolve(_SD2_UNET, prediction="v"), AutoencoderConfig(), _SD2_TEXT),
    "tiny": Architecture(_TINY_UNET, _TINY_VAE, _TINY_TEXT),
    "tiny-v": Architecture(attrs.evolve(_TINY_UNET, prediction="v"), _TINY_VAE, _TINY_TEXT),
    "tiny-2": Architecture(attrs.evolve(_TINY_UNET, linear_projection=True), _TINY_VAE,
                           attrs.evolve(_TINY_TEXT, activation="gelu", layers=3, skip_last_layers=1, pad="zero")),
    # the quickstart model (examples/shapes-train.toml): 4 channels per GroupNorm group, as in SD,
    # so that flat colours survive the normalisations
    "shapes-64": Architecture(
        UNetConfig(channels=(64, 128), attention=(True, True), heads=(4, 4), layers_per_block=1, context_dim=32,
                   groups=16),
        AutoencoderConfig(channels=(32, 32, 64, 64), layers_per_block=1, groups=8),
        TextEncoderConfig(width=32, layers=2, heads=4, context_length=16)),
}
"""sd-1: CLIP ViT-L/14, context 768, eps. sd-2: OpenCLIP ViT-H/14 penultimate layer, context
1024, linear projections, head dim 64, eps. sd-2-v: sd-2 with v-prediction. tiny*: test sizes. shapes-64: the quickstart model
(64x64 pixels, 8x8x4 latents)."""
