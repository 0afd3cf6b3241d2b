"""Sampling a DeepFloyd IF stage with the engine's pieces.

The chain is the core's: :class:`~t2i_engine.diffusion.parameterization.DenoiserWrapper` turns
the eps half of the UNet output into ``D(x, sigma) -> x0``, the core's
:class:`~t2i_engine.diffusion.guidance.CFGDenoiser` guides it (CFG on x0 is CFG on eps: x0 is
affine in eps with the same coefficients in both branches) and
:class:`~t2i_engine.diffusion.guidance.DynamicThreshold` thresholds it. What IF adds is the
``learned_range`` variance (Nichol & Dhariwal 2021, eq. 15): the UNet's second half ``v`` sets
the DDPM step's log-variance ``frac log beta_t + (1 - frac) log beta_tilde_t``,
``frac = (v + 1) / 2``, taken from the text branch only (diffusers' ``IFPipeline``).
:func:`sample_ddpm_learned_range` is DDPM ancestral sampling with that variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from t2i_engine.diffusion.guidance import CFGDenoiser, DynamicThreshold, StaticClip
from t2i_engine.diffusion.parameterization import DenoiserWrapper
from t2i_engine.diffusion.samplers._common import ancestral_step, call, noise_like, report, sigma_list, to_d
from t2i_engine.diffusion.schedules import DiscreteSchedule, sigma_to_alpha_bar
from t2i_engine.interfaces import Conditioning, Denoiser, DenoiserNet, StepCallback
from t2i_plugin_imagen.if_schedule import IFSchedulerConfig
from t2i_plugin_imagen.if_unet import IFUNet


class IFEpsNet(DenoiserNet):
    """The eps half of an :class:`IFUNet`'s output as a plain eps network (what the core's
    wrappers and samplers see); the variance half of the latest call is kept in
    :attr:`variance` ``(B, C, H, W)`` for :func:`sample_ddpm_learned_range`."""

    prediction = "eps"

    def __init__(self, unet: IFUNet) -> None:
        super().__init__()
        self.unet = unet
        self.variance: Tensor | None = None

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        eps, v = self.unet(x_t, t, cond).chunk(2, dim=1)
        self.variance = v
        return eps


def learned_std(sigma: float, sigma_next: float, v: Tensor) -> Tensor:
    """The std, in sigma space at ``sigma_next``, of a DDPM step from ``sigma`` with the
    ``learned_range`` output ``v`` in [-1, 1] (diffusers' ``DDPMScheduler._get_variance``)."""
    a_t, a_prev = (float(sigma_to_alpha_bar(torch.tensor(s, dtype=torch.float64))) for s in (sigma, sigma_next))
    beta = 1 - a_t / a_prev  # the step's effective beta
    beta_tilde = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)  # posterior variance
    frac = (v.float() + 1) / 2
    log_var = frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)
    return ((0.5 * log_var).exp() / math.sqrt(a_prev)).to(v.dtype)  # VP std -> sigma space


@torch.no_grad()
def sample_ddpm_learned_range(model: Denoiser, x: Tensor, sigmas: Tensor, *, variance: Callable[[], Tensor],
                              generator: torch.Generator | None = None,
                              callback: StepCallback | None = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) with a learned variance (Nichol & Dhariwal 2021):
    the posterior mean of the core's ``ddpm`` sampler, noise of std :func:`learned_std`.

    ``variance()`` returns the ``v`` output of the model call just made, ``(B, C, H, W)``.
    """
    s = sigma_list(sigmas)
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        sigma_down, _ = ancestral_step(s[i], s[i + 1], eta=1.0)
        x = x + to_d(x, s[i], denoised) * (sigma_down - s[i])  # the posterior mean
        if s[i + 1] > 0:
            x = x + noise_like(x, generator) * learned_std(s[i], s[i + 1], variance())
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


def noise_lowres(lowres: Tensor, size: tuple[int, int], *, noise_level: int, schedule: DiscreteSchedule,
                 noise: Tensor) -> Tensor:
    """IF stage II's input image: ``lowres`` bilinearly upsampled (align_corners, as IF) and
    noised to timestep ``noise_level`` of ``schedule`` (noise conditioning augmentation, VP form)."""
    up = F.interpolate(lowres, size, mode="bilinear", align_corners=True)
    a = schedule.alphas_cumprod[noise_level].to(up)
    return a.sqrt() * up + (1 - a).sqrt() * noise


def guided_if_denoiser(net: IFEpsNet, config: IFSchedulerConfig, *, cond: Conditioning, uncond: Conditioning,
                       guidance_scale: float) -> tuple[Denoiser, Callable[[], Tensor]]:
    """The sampler-space denoiser of one IF stage and where its text-branch variance is read.

    CFG is off at ``guidance_scale <= 1`` (as ``IFPipeline``); thresholding as the scheduler
    config says (``thresholding`` wins over ``clip_sample``).
    """
    schedule = config.schedule()
    inner = DenoiserWrapper(net, schedule, round_t=True)  # DDPM runs the integer timesteps
    scale = guidance_scale if guidance_scale > 1 else 1.0
    model: Denoiser = CFGDenoiser(inner, cond, uncond, scale=scale)
    if config.thresholding:
        model = DynamicThreshold(model, percentile=config.dynamic_thresholding_ratio, ceiling=config.sample_max_value)
    elif config.clip_sample:
        model = StaticClip(model, max_value=config.clip_sample_range)
    batch = cond.batch_size or 0

    def text_variance() -> Tensor:
        assert net.variance is not None
        return net.variance[-batch:]  # CFGDenoiser batches [uncond, cond]: the text branch is last

    return model, text_variance


def sample_stage(net: IFEpsNet, config: IFSchedulerConfig, *, cond: Conditioning, uncond: Conditioning,
                 noise: Tensor, steps: int, guidance_scale: float, generator: torch.Generator | None = None,
                 callback: StepCallback | None = None) -> Tensor:
    """One IF stage from unit noise ``noise`` ``(B, 3, H, W)`` (VP scale) to images in about [-1, 1]."""
    schedule = config.schedule()
    model, variance = guided_if_denoiser(net, config, cond=cond, uncond=uncond, guidance_scale=guidance_scale)
    sigmas = schedule.sampling_sigmas(steps)
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)  # VP noise -> sigma space
    if config.variance_type == "learned_range":
        return sample_ddpm_learned_range(model, x, sigmas, variance=variance, generator=generator, callback=callback)
    from t2i_engine.diffusion.samplers.ancestral import sample_ddpm

    return sample_ddpm(model, x, sigmas, generator=generator, callback=callback)


def stage_two_conditioning(cond: Conditioning, lowres: Tensor, noise_level: int) -> Conditioning:
    """``cond`` with stage II's upsampled noisy image and its noise level added."""
    levels = torch.full((lowres.shape[0],), noise_level, dtype=torch.long, device=lowres.device)
    return cond.with_extras(lowres=lowres, noise_level=levels)


__all__ = ["IFEpsNet", "guided_if_denoiser", "learned_std", "noise_lowres", "sample_ddpm_learned_range",
                          "sample_stage", "stage_two_conditioning"]
