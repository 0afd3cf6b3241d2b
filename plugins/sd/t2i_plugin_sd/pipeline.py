"""Generation with a :class:`StableDiffusion` model: a thin adapter over the core's
:func:`t2i_engine.pipeline.generate` (the loop itself is model-agnostic and lives in the core).

Kept for Python users of the plugin: it takes ``steps`` and ``guidance_scale`` directly and
returns images in [0, 1], as diffusers' ``output_type="pt"`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.interfaces import LatentDiffusionModel, Sampler, StepCallback
from t2i_engine.pipeline import check_prompts, encode_prompts
from t2i_engine.pipeline import generate as core_generate
from t2i_engine.pipeline import sampling_sigmas_for

__all__ = ["check_prompts", "encode_prompts", "generate"]


def generate(model: LatentDiffusionModel, prompts: Sequence[str], noise: Tensor, *, sampler: Sampler,
             steps: int | None = None, guidance_scale: float = 7.5,
             negative_prompts: Sequence[str] | None = None, init_images: Tensor | None = None,
             strength: float = 0.8, generator: torch.Generator | None = None,
             callback: StepCallback | None = None) -> Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1]; see :func:`t2i_engine.pipeline.generate`.

    ``steps`` is needed for a bare sampler function (``sample_ddim``); a registered sampler
    (``SAMPLERS["ddim"](DDIMConfig(steps=30))``) carries its own unless ``steps`` overrides it.
    """
    sigmas = sampling_sigmas_for(sampler, model.schedule, steps=steps,
                                 device=next(model.denoiser.parameters()).device)
    images = core_generate(model, prompts, noise, sampler=sampler, sigmas=sigmas,
                           guidance=GuidanceConfig(guidance_scale=float(guidance_scale)),
                           negative_prompts=negative_prompts, init_images=init_images, strength=strength,
                           generator=generator, callback=callback)
    return images / 2 + 0.5
