"""Ancestral samplers: a deterministic step down to ``sigma_down`` plus fresh noise ``sigma_up``.

DDPM ancestral sampling, DDIM with ``eta`` and Euler ancestral are one update in sigma space:
DDIM's ``sigma_t(eta)`` (Song et al. 2021, eq. 16) equals k-diffusion's ``sigma_up`` and its
``sqrt(1 - a_prev - sigma_t^2) * eps`` direction is an Euler step to ``sigma_down`` (see
:func:`~t2i_engine.diffusion.samplers._common.ancestral_step`).
"""

from __future__ import annotations

import math

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
    return _ancestral(model, x, sigmas, generator=generator, callback=callback, eta=eta, s_noise=s_noise)


@torch.no_grad()
def sample_ddim(model: Denoiser, x: Tensor, sigmas: Tensor, *,
                generator: torch.Generator | None = None, callback: StepCallback | None = None,
                eta: float = 0.0, targets: Tensor | None = None) -> Tensor:
    """DDIM (Song et al. 2021): ``eta = 0`` is deterministic, ``eta = 1`` is DDPM's posterior.

    ``targets`` ``(steps - 1,)``: where step ``i`` lands when that is not ``sigmas[i + 1]``.
    diffusers' DDIMScheduler steps from ``t`` to ``t - T // steps``, which on a ``linspace`` or
    ``trailing`` grid whose step count does not divide ``T`` is not the next timestep; the
    sample is then taken as it stands (in VP space) at the next timestep, as diffusers does.
    """
    return _ancestral(model, x, sigmas, generator=generator, callback=callback, eta=eta, targets=targets)


@torch.no_grad()
def sample_ddpm(model: Denoiser, x: Tensor, sigmas: Tensor, *,
                generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) with the posterior variance ``beta_tilde``,
    on any (sub)sequence of noise levels."""
    return _ancestral(model, x, sigmas, generator=generator, callback=callback, eta=1.0)


def _ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None,
               callback: StepCallback | None, eta: float, s_noise: float = 1.0,
               targets: Tensor | None = None) -> Tensor:
    """The shared loop: a deterministic step to ``sigma_down``, fresh noise ``sigma_up``."""
    s = sigma_list(sigmas)
    to = [*sigma_list(targets), s[-1]] if targets is not None else s[1:]
    if len(to) != len(s) - 1:
        raise ValueError(f"{len(to) - 1} targets for {len(s) - 1} steps (want one per step but the last)")
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], to[i], eta=eta)
        x = x + to_d(x, s[i], denoised) * (sigma_down - s[i])
        if sigma_up > 0:
            x = x + noise_like(x, generator) * (s_noise * sigma_up)
        if to[i] != s[i + 1]:  # relabel: the same VP sample, read at the next level
            x = x * math.sqrt((1 + s[i + 1] ** 2) / (1 + to[i] ** 2))
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x
