"""Sampling an Imagen cascade: base -> super-resolution 1 (-> super-resolution 2), each stage with
its own sampler, steps, guidance, dynamic thresholding and augmentation level (Saharia et al. 2022,
sec. 2.4-2.5).

:func:`sample_stage` is the core's sampling tail (:func:`t2i_engine.pipeline.denoise`) with the
low-resolution input of a super-resolution stage added to both guidance branches; its
augmentation noise is drawn first from the generator, then the sampler's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from t2i_engine.diffusion.guidance import GuidanceConfig, guided_denoiser
from t2i_engine.diffusion.parameterization import DenoiserWrapper
from t2i_engine.pipeline import check_prompts, denoise, encode_prompts, mark_branches, sampling_plan_for
from t2i_plugin_imagen.stage import ImagenStage


@torch.no_grad()
def sample_stage(stage: ImagenStage, prompts: Sequence[str], noise: Tensor, *, sampler: Any,
                 guidance: GuidanceConfig | None = None, lowres: Tensor | None = None, aug_sigma: float | None = None,
                 negative_prompts: Sequence[str] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Images ``(B, 3, S, S)`` in [-1, 1] of one stage.

    Args:
        stage: the stage (its schedule and preconditioning).
        prompts: one prompt per image.
        noise: ``(B, 3, S, S)`` unit-variance starting noise (``S`` the stage's size).
        sampler: a registered sampler (``SAMPLERS["edm"](EDMConfig(...))`` ...).
        guidance: CFG scale and dynamic thresholding (``dynamic_threshold`` p, ``dynamic_threshold_max``).
        lowres: super-resolution: the previous stage's images ``(B, 3, s, s)`` in [-1, 1].
        aug_sigma: the augmentation level of ``lowres`` (default: the stage's ``noise_aug.sample_sigma``).
        negative_prompts: the unconditional branch (default ``""``, the null text).
        generator: the randomness (augmentation noise first, then the sampler's).
    """
    prompts = check_prompts(prompts)
    if noise.ndim != 4 or noise.shape[0] != len(prompts) or noise.shape[1] != 3:
        raise ValueError(f"noise must be ({len(prompts)}, 3, S, S), got {tuple(noise.shape)}")
    cond, uncond = mark_branches(*encode_prompts(stage.text_encoder, prompts, negative_prompts))
    device = noise.device
    cond, uncond = cond.to(device=device), uncond.to(device=device)
    if stage.lowres_size is not None:
        if lowres is None:
            raise ValueError(f"{stage.description} needs lowres= (the previous stage's images)")
        if lowres.shape[0] != noise.shape[0]:
            raise ValueError(f"lowres has {lowres.shape[0]} images for {noise.shape[0]} noise tensors")
        level = stage.noise_aug.sample_sigma if aug_sigma is None else aug_sigma
        aug = torch.randn(noise.shape, generator=generator, device=generator.device if generator else device)
        extras = stage.lowres_conditioning(lowres.to(noise), aug_sigma=torch.full((noise.shape[0],), float(level)),
                                           noise=aug.to(noise))
        cond, uncond = cond.with_extras(**extras), uncond.with_extras(**extras)
    elif lowres is not None:
        raise ValueError(f"{stage.description} takes no lowres= (it is a base stage)")
    plan = sampling_plan_for(sampler, stage.schedule)
    sigmas = plan.sigmas
    denoiser = guided_denoiser(DenoiserWrapper(stage.unet, plan.schedule, round_t=plan.round_t),
                               guidance or GuidanceConfig(), cond=cond, uncond=uncond)
    x = noise * plan.start_std(float(sigmas[0]))
    return denoise(sampler, plan, denoiser, x, sigmas, generator=generator).clamp(-1, 1)
