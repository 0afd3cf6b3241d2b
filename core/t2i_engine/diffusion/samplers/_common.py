"""Helpers shared by the samplers (one copy of each step fragment, no pasted blocks)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from t2i_engine.interfaces import Denoiser, StepCallback


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative ``dx/dsigma = (x - D(x, sigma)) / sigma`` (= eps)."""
    return (x - denoised) / sigma


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` on ``x``'s device."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def ancestral_step(sigma_from: float, sigma_to: float, *, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to ``sigma_down`` and fresh noise ``sigma_up``.

    ``sigma_up = eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)`` is DDIM's
    ``sigma_t(eta)`` (Song et al. 2021, eq. 16) rewritten in sigma space; ``eta = 1`` is the DDPM
    posterior. ``sigma_down^2 + sigma_up^2 = sigma_to^2``.
    """
    if sigma_to == 0 or eta == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def churn(x: Tensor, sigma: float, *, gamma: float, s_noise: float,
          generator: torch.Generator | None, draw: bool = False) -> tuple[Tensor, float]:
    """EDM's stochastic "churn" (Karras et al. 2022, Algorithm 2, lines 5-6).

    Raises the noise level from ``sigma`` to ``sigma_hat = sigma (1 + gamma)`` by adding fresh
    noise; returns ``(x_hat, sigma_hat)``. ``gamma = 0`` returns ``x`` unchanged. With ``draw``
    the noise is drawn even then, as k-diffusion does on every churn step, so that a seed gives
    k-diffusion's sample when ``[s_tmin, s_tmax]`` leaves some steps out.
    """
    if gamma <= 0 and not draw:
        return x, sigma
    eps = noise_like(x, generator) * s_noise
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + eps * math.sqrt(sigma_hat**2 - sigma**2), sigma_hat


def churn_gamma(sigma: float, steps: int, *, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM's ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` inside ``[S_tmin, S_tmax]``, else 0."""
    if s_churn <= 0 or not (s_tmin <= sigma <= s_tmax):
        return 0.0
    return min(s_churn / steps, math.sqrt(2) - 1)


def call(model: Denoiser, x: Tensor, sigma: float) -> Tensor:
    """Evaluate the denoiser at one noise level for the whole batch (sigma as ``(B,)``)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # keep sigma precise under fp16/bf16
    return model(x, torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device))


def report(callback: StepCallback | None, i: int, x: Tensor, sigma: float, sigma_next: float,
           denoised: Tensor) -> None:
    """Call the per-step callback, when there is one."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def sigma_list(sigmas: Tensor) -> list[float]:
    """The sigma sequence as Python floats (step sizes are scalars; avoids device syncs per step)."""
    return [float(s) for s in sigmas.detach().cpu().tolist()]
