"""Deterministic (probability-flow ODE) samplers, with EDM's optional churn on Euler and Heun.

All take ``model(x, sigma) -> x0``, the start ``x`` (noise at ``sigmas[0]``) and a decreasing
sigma sequence (usually ending in 0), and return the sample at ``sigmas[-1]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from t2i_engine.diffusion.parameterization import from_x0, to_x0
from t2i_engine.diffusion.samplers._common import (
    call, churn, churn_gamma, noise_like, report, sigma_list, to_d,
)
from t2i_engine.interfaces import Denoiser, StepCallback


@torch.no_grad()
def sample_euler(model: Denoiser, x: Tensor, sigmas: Tensor, *,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                 s_noise: float = 1.0) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the
    2nd-order correction). With ``eta``-free DDIM (Song et al. 2021) this is the same update."""
    s = sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        gamma = churn_gamma(s[i], n, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax)
        x, sigma_hat = churn(x, s[i], gamma=gamma, s_noise=s_noise, generator=generator, draw=s_churn > 0)
        denoised = call(model, x, sigma_hat)
        x = x + to_d(x, sigma_hat, denoised) * (s[i + 1] - sigma_hat)
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: Tensor, sigmas: Tensor, *,
                generator: torch.Generator | None = None, callback: StepCallback | None = None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                s_noise: float = 1.0) -> Tensor:
    """Heun's 2nd-order method with EDM's stochastic churn (Karras et al. 2022, Algorithm 2).

    ``s_churn = 0`` is the deterministic sampler (Algorithm 1); the step to sigma 0 is Euler.
    """
    s = sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        gamma = churn_gamma(s[i], n, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax)
        x, sigma_hat = churn(x, s[i], gamma=gamma, s_noise=s_noise, generator=generator, draw=s_churn > 0)
        denoised = call(model, x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        dt = s[i + 1] - sigma_hat
        x_euler = x + d * dt
        if s[i + 1] == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, s[i + 1], call(model, x_euler, s[i + 1]))
            x = x + (d + d_next) / 2 * dt
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


def lms_coefficients(s: list[float], i: int, order: int) -> list[float]:
    """Linear multistep weights for step ``i``: the integral from ``s[i]`` to ``s[i+1]`` of each
    Lagrange basis polynomial through ``s[i], s[i-1], ..., s[i-order+1]`` (exact, by polynomial
    integration). Weight ``j`` multiplies the derivative at ``s[i - j]``."""
    coeffs = []
    for j in range(order):
        poly = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != j:
                poly = poly * np.polynomial.Polynomial([-s[i - k], 1.0]) / (s[i - j] - s[i - k])
        integral = poly.integ()
        coeffs.append(float(integral(s[i + 1]) - integral(s[i])))
    return coeffs


@torch.no_grad()
def sample_lms(model: Denoiser, x: Tensor, sigmas: Tensor, *,
               generator: torch.Generator | None = None, callback: StepCallback | None = None,
               order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth on the sigma grid) of order up to ``order``
    (Karras et al. 2022's ODE in k-diffusion's ``sample_lms``; Crowson)."""
    s = sigma_list(sigmas)
    ds: list[Tensor] = []  # derivatives, oldest first
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        ds = [*ds, to_d(x, s[i], denoised)][-order:]
        coeffs = lms_coefficients(s, i, len(ds))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
       4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
"""Adams-Bashforth weights for equal steps, newest derivative first."""


@torch.no_grad()
def sample_plms(model: Denoiser, x: Tensor, sigmas: Tensor, *,
                generator: torch.Generator | None = None, callback: StepCallback | None = None,
                targets: Tensor | None = None, warmup_from: float | None = None) -> Tensor:
    """Pseudo linear multistep, PLMS/PNDM (Liu et al. 2022) with the Heun warm-up of diffusers'
    ``PNDMScheduler(skip_prk_steps=True)``: 4th-order Adams-Bashforth with fixed weights.

    As diffusers does, the multistep combines the network's raw outputs (eps, or v for a
    v-prediction network: ``model.prediction``, default eps) and turns the combination into a
    step at the current point; for v this differs from combining eps. Step ``i`` costs one model
    call; the first costs two when more steps follow.

    ``targets`` and ``warmup_from`` reproduce diffusers on grids whose steps do not chain (it
    steps from ``t`` to ``t - T // steps``; see :func:`sample_ddim`): where step ``i`` lands
    when that is not ``sigmas[i + 1]``, and the level the warm-up step starts from
    (``t_1 + T // steps`` rather than ``t_0``).
    """
    prediction, sigma_data = getattr(model, "prediction", "eps"), float(getattr(model, "sigma_data", 0.5))

    def raw(x0: Tensor, x_at: Tensor, sigma: float) -> Tensor:
        return from_x0(x0, x_at, torch.tensor(sigma), prediction=prediction, sigma_data=sigma_data)

    def step(x_at: Tensor, sigma: float, out: Tensor, sigma_to: float) -> Tensor:
        x0 = to_x0(out, x_at, torch.tensor(sigma), prediction=prediction, sigma_data=sigma_data)
        return x_at + to_d(x_at, sigma, x0) * (sigma_to - sigma)

    def relabel(x_at: Tensor, sigma: float, sigma_new: float) -> Tensor:
        """The same VP sample read at another level (x_vp = x / sqrt(1 + sigma^2) kept)."""
        return x_at if sigma == sigma_new else x_at * math.sqrt((1 + sigma_new**2) / (1 + sigma**2))

    s = sigma_list(sigmas)
    to = [*sigma_list(targets), s[-1]] if targets is not None else s[1:]
    outs: list[Tensor] = []  # raw outputs at the accepted points, oldest first
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        out = raw(denoised, x, s[i])
        outs = [*outs, out][-4:]
        if i == 0 and len(s) > 2:
            # warm-up: Heun, averaging the output here and at the Euler-predicted next point
            x_next = relabel(step(x, s[0], out, to[0]), to[0], s[1])
            out_prime = (out + raw(call(model, x_next, s[1]), x_next, s[1])) / 2
            start = s[0] if warmup_from is None else warmup_from
            x = step(relabel(x, s[0], start), start, out_prime, s[1])
        else:
            out_prime = sum(w * o for w, o in zip(_AB[len(outs)], reversed(outs)))
            x = step(x, s[i], out_prime, to[i])
            if i < len(s) - 2:
                x = relabel(x, to[i], s[i + 1])
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: Tensor, sigmas: Tensor, *,
                    generator: torch.Generator | None = None,
                    callback: StepCallback | None = None, first_order_final: bool = False) -> Tensor:
    """DPM-Solver++(2M), the 2nd-order multistep data-prediction solver (Lu et al. 2022, Alg. 2).

    The first step and a step to sigma 0 are first order; ``first_order_final`` makes the last
    step first order also when it ends above 0 (diffusers' ``lower_order_final`` below 15 steps).
    """
    return _dpmpp_2m(model, x, sigmas, eta=0.0, s_noise=1.0, generator=generator, callback=callback,
                     first_order_final=first_order_final)


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x: Tensor, sigmas: Tensor, *,
                        generator: torch.Generator | None = None,
                        callback: StepCallback | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, first_order_final: bool = False) -> Tensor:
    """SDE-DPM-Solver++(2M), midpoint form (Lu et al. 2022, Appendix; diffusers'
    ``algorithm_type="sde-dpmsolver++"``). ``eta = 0`` recovers DPM-Solver++(2M)."""
    return _dpmpp_2m(model, x, sigmas, eta=eta, s_noise=s_noise, generator=generator, callback=callback,
                     first_order_final=first_order_final)


def _dpmpp_2m(model: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float, s_noise: float,
              generator: torch.Generator | None, callback: StepCallback | None,
              first_order_final: bool = False) -> Tensor:
    """The shared 2M loop in ``lambda = -log(sigma)``; ``eta > 0`` adds the SDE noise."""
    s = sigma_list(sigmas)
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            h_eta = h * (eta + 1)
            d = denoised
            if old_denoised is not None and not (first_order_final and i == len(s) - 2):
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i] * math.exp(-h * eta)) * x - math.expm1(-h_eta) * d
            if eta > 0:
                x = x + noise_like(x, generator) * s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
            h_last = h
        old_denoised = denoised
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x
