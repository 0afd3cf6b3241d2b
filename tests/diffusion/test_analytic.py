"""Samplers against the closed-form denoiser of Gaussian data N(mu, s^2).

For x = x0 + sigma * eps the exact denoiser is ``mu + s^2 / (s^2 + sigma^2) (x - mu)`` and the
probability-flow ODE maps x(sigma_a) to ``mu + sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2)) (x - mu)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from t2i_engine.diffusion import samplers as S
from t2i_engine.diffusion.registry import SAMPLERS, build
from t2i_engine.diffusion.schedules import append_zero, karras_sigmas

MU, STD = 0.3, 0.5


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + STD**2 / (STD**2 + sig**2) * (x - MU)


def ode_solution(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    return MU + math.sqrt((STD**2 + sigma_to**2) / (STD**2 + sigma_from**2)) * (x - MU)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sample_distribution_matches_data(name):
    """Every sampler, started from the exact noised marginal, yields N(mu, s^2) samples."""
    n = 20000
    sigmas = append_zero(karras_sigmas(200, 0.002, 80.0))
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = MU + math.sqrt(STD**2 + 80.0**2) * z
    sampler = build(SAMPLERS, name, steps=200)
    out = sampler(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(2))
    assert out.shape == x.shape
    # standard errors: mean 0.0035, std 0.0025; the rest is discretisation of first-order SDEs
    assert abs(float(out.mean()) - MU) < 0.01
    assert abs(float(out.std()) - STD) < 0.02


@pytest.mark.parametrize("fn,order", [
    (S.sample_euler, 1), (S.sample_ddim, 1), (S.sample_heun, 2), (S.sample_dpmpp_2m, 2),
])
def test_ode_convergence_order(fn, order):
    """Halving the step size divides the global error by ~2^order."""
    z = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in (16, 32, 64):
        sigmas = karras_sigmas(n + 1, 0.05, 10.0)
        x = MU + math.sqrt(STD**2 + 10.0**2) * z
        exact = ode_solution(x, 10.0, 0.05)
        errors.append(float((fn(gaussian_denoiser, x, sigmas) - exact).abs().max()))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    for r in ratios:
        assert 2**order * 0.85 < r < 2**order * 1.2, ratios


@pytest.mark.parametrize("fn", [S.sample_lms, S.sample_plms])
def test_multistep_beats_second_order(fn):
    """LMS and PLMS (4th-order multistep) converge at least as fast as 2nd order."""
    z = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in (16, 32, 64):
        sigmas = karras_sigmas(n + 1, 0.05, 10.0)
        x = MU + math.sqrt(STD**2 + 10.0**2) * z
        errors.append(float((fn(gaussian_denoiser, x, sigmas) - ode_solution(x, 10.0, 0.05)).abs().max()))
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, errors


def test_callback_and_generator_reproducibility():
    sigmas = append_zero(karras_sigmas(5, 0.1, 10.0))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * 10
    seen = []
    a = S.sample_euler_ancestral(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3),
                                 callback=seen.append)
    b = S.sample_euler_ancestral(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert [d["i"] for d in seen] == list(range(5))
    assert set(seen[0]) == {"i", "x", "sigma", "sigma_next", "denoised"}
    assert seen[-1]["sigma_next"] == 0 and torch.equal(seen[-1]["x"], a)
