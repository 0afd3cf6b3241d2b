"""Hook implementations of the Stable Diffusion plugin (entry point ``sd``)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from t2i_engine.config.fields import existing_path, option
from t2i_engine.errors import ConfigError
from t2i_engine.hookspecs import hookimpl

PRESET_NAMES = ("sd-1", "sd-2", "sd-2-v", "tiny", "tiny-v", "tiny-2", "shapes-64")


@attrs.frozen
class StableDiffusionConfig:
    """``[model] type = "stable-diffusion"``."""

    preset: Literal["sd-1", "sd-2", "sd-2-v", "tiny", "tiny-v", "tiny-2", "shapes-64"] | None = option(
        default=None, help="architecture; default: inferred from the checkpoint (sd-1 without one)")
    checkpoint: str | None = existing_path(default=None, help="diffusers folder, single file or .nemo archive")
    format: Literal["diffusers", "single-file", "nemo"] | None = option(
        default=None, help="checkpoint format; default: detected from the files")
    prediction: Literal["eps", "v"] | None = option(default=None, help="override the prediction type")
    scaling_factor: float | None = option(default=None, help="override the latent scaling factor")
    unet_heads: list[int] | None = option(default=None, help="attention heads per UNet level (not in the weights)")
    text_heads: int | None = option(default=None, help="attention heads of the text tower")


def build_stable_diffusion(config: StableDiffusionConfig) -> Any:
    """Build the model: weights from ``checkpoint`` (architecture inferred), else the preset
    with random weights."""
    from t2i_plugin_sd.formats import load_checkpoint
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    overrides = {"prediction": config.prediction, "scaling_factor": config.scaling_factor,
                 "unet_heads": tuple(config.unet_heads) if config.unet_heads else None, "text_heads": config.text_heads}
    if config.checkpoint is None:
        arch = PRESETS[config.preset or "sd-1"]
        if config.prediction is not None:
            arch = attrs.evolve(arch, unet=attrs.evolve(arch.unet, prediction=config.prediction))
        return build_model(None, arch)
    weights = load_checkpoint(config.checkpoint, format=config.format)
    preset = config.preset
    if preset is None:
        width = int(weights.text["token_embedding.weight"].shape[1])
        preset = "sd-1" if width == 768 else "sd-2"
        if preset == "sd-2" and "prediction" not in weights.hints and config.prediction is None:
            raise ConfigError(f"{config.checkpoint}: an SD 2 layout checkpoint does not say whether it predicts "
                              "eps or v; set [model] prediction = \"eps\" or \"v\" (or preset = \"sd-2\"/\"sd-2-v\")")
    base = PRESETS[preset]
    weights.hints.setdefault("prediction", base.prediction)
    return build_model(weights, base, overrides=overrides, explicit=config.preset is not None)


build_stable_diffusion.Config = StableDiffusionConfig  # type: ignore[attr-defined]


def _formats() -> dict[str, Any]:
    from t2i_plugin_sd.formats import CHECKPOINT_FORMATS

    return dict(CHECKPOINT_FORMATS)


@hookimpl
def register_models() -> dict[str, Any]:
    """``stable-diffusion``."""
    return {"stable-diffusion": build_stable_diffusion}


@hookimpl
def register_tasks() -> dict[str, Any]:
    """Stable Diffusion's own tasks; the generic ``sample``, ``train`` and ``precache`` are the
    core's (they drive this plugin's model through ``LatentDiffusionModel``)."""
    from t2i_plugin_sd.shapes_tasks import SHAPES_TASKS

    return {**SHAPES_TASKS}


@hookimpl
def register_checkpoint_formats() -> dict[str, Any]:
    """Prefixed ``sd-``: ``sd-diffusers``, ``sd-single-file``, ``sd-nemo``."""
    return {f"sd-{name}": factory for name, factory in _formats().items()}
