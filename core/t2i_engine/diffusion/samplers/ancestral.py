"""Ancestral samplers: a deterministic step down to ``sigma_down`` plus fresh noise ``sigma_up``.

DDPM ancestral sampling, DDIM with ``eta`` and Euler ancestral are one update in sigma space:
DDIM's ``sigma_t(eta)`` (Song et al. 2021, eq. 16) equals k-diffusion's ``sigma_up`` and its
``sqrt(1 - a_prev - sigma_t^2) * eps`` direction is an Euler step to ``sigma_down`` (see
:func:`~t2i_engine.diffusion.samplers._common.ancestral_step`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from t2i_engine.diffusion.samplers._common import (
    ancestral_step, call, noise_like, report, sigma_list, to_d,
)
from t2i_engine.interfaces import Denoiser, StepCallback


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, *,
                           generator: torch.Generator | None = None,
                           callback: StepCallback | None = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> Tensor:
    """Euler ancestral (k-diffusion, Crowson; diffusers' ``EulerAncestralDiscreteScheduler``)."""
    s = sigma_list(sigmas)
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta=eta)
        x = x + to_d(x, s[i], denoised) * (sigma_down - s[i])
        if sigma_up > 0:
            x = x + noise_like(x, generator) * (s_noise * sigma_up)
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_ddim(model: Denoiser, x: Tensor, sigmas: Tensor, *,
                generator: torch.Generator | None = None, callback: StepCallback | None = None,
                eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021): ``eta = 0`` is deterministic, ``eta = 1`` is DDPM's posterior."""
    return sample_euler_ancestral(model, x, sigmas, generator=generator, callback=callback, eta=eta)


@torch.no_grad()
def sample_ddpm(model: Denoiser, x: Tensor, sigmas: Tensor, *,
                generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) with the posterior variance ``beta_tilde``,
    on any (sub)sequence of noise levels."""
    return sample_euler_ancestral(model, x, sigmas, generator=generator, callback=callback, eta=1.0)
