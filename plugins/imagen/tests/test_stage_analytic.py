"""An Imagen stage's sampling chain against a closed-form denoiser.

The stage's UNet is replaced by the network that the EDM preconditioning (Karras et al. 2022,
Table 1: ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``,
``c_noise = ln(s)/4``) turns into the exact denoiser of a known distribution: every pixel drawn
independently from the Gaussian mixture ``0.5 N(-m, v) + 0.5 N(m, v)``. Written out here from
the paper, not from the engine's code, so a wrong scaling, time input, starting noise or sampling
range in :func:`t2i_plugin_imagen.cascade.sample_stage` shows as samples off that mixture.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

M, S = 0.6, 0.1  # mixture modes at +-M, each with std S
SD = 0.5  # EDM sigma_data of the stage


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x = x0 + sigma n, x0 ~ 0.5 N(-M, S^2) + 0.5 N(M, S^2) per pixel."""
    var = S**2 + sigma**2
    logits = torch.stack([-(x - mu) ** 2 / (2 * var) for mu in (-M, M)])  # (2, ...) equal weights and variances
    w = logits.softmax(dim=0)
    return sum(w[k] * (mu + S**2 / var * (x - mu)) for k, mu in enumerate((-M, M)))


class AnalyticEDMNet(nn.Module):
    """``F(c_in x, c_noise)`` whose preconditioned output is :func:`mixture_denoiser`."""

    prediction = "edm"

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config  # the replaced UNet's keys (the stage reads noise_cond_aug ...)
        self.calls = 0

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self.calls += 1
        x_in = x_in.double()
        sigma = torch.exp(4 * t.double()).reshape(-1, 1, 1, 1)  # c_noise = ln(sigma) / 4
        x = x_in * torch.sqrt(sigma**2 + SD**2)  # undo c_in
        c_skip = SD**2 / (sigma**2 + SD**2)
        c_out = sigma * SD / torch.sqrt(sigma**2 + SD**2)
        return ((mixture_denoiser(x, sigma) - c_skip * x) / c_out).float()


@pytest.mark.parametrize("steps", [24])
def test_sample_stage_recovers_a_gaussian_mixture(make_stage, steps):
    from t2i_plugin_imagen.cascade import sample_stage

    from t2i_engine.diffusion.guidance import GuidanceConfig
    from t2i_engine.diffusion.registry import SAMPLERS

    stage = make_stage("base")  # 8 px, EDM sigma_data 0.5, sigmas 0.002..80
    stage.unet = AnalyticEDMNet(stage.unet.config)
    n = 64
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 3, 8, 8, generator=g)
    sampler = SAMPLERS["edm"](SAMPLERS["edm"].Config(steps=steps, s_churn=0.0))
    out = sample_stage(stage, ["a red circle"] * n, noise, sampler=sampler, guidance=GuidanceConfig(guidance_scale=1.0),
                       generator=g).double()
    assert stage.unet.calls == 2 * steps - 1  # Heun: two calls per step, one for the last (to sigma 0)
    pixels = out.flatten()  # 12288 independent draws
    positive = pixels > 0
    # mode weights 0.5 each: standard error 0.0045
    assert positive.double().mean().item() == pytest.approx(0.5, abs=0.02)
    for mode, sign in ((pixels[positive], 1), (pixels[~positive], -1)):
        assert mode.mean().item() == pytest.approx(sign * M, abs=0.01)  # standard error 0.0013
        assert mode.std().item() == pytest.approx(S, rel=0.1)  # ODE discretisation error included


def test_sampling_range_end_is_the_denoisers_estimate(make_stage):
    """With ``sigma_min`` raised, the last step (to 0) returns the denoiser's estimate at
    ``sigma_min``: each pixel is pulled to its mode's mean, so the spread shrinks by the exact
    factor ``S^2 / (S^2 + sigma_min^2)`` of the Gaussian posterior mean around that mode."""
    from t2i_plugin_imagen.cascade import sample_stage

    from t2i_engine.diffusion.guidance import GuidanceConfig
    from t2i_engine.diffusion.registry import SAMPLERS

    stage = make_stage("base")
    stage.unet = AnalyticEDMNet(stage.unet.config)
    stage.set_sampling_range(sigma_min=0.1)
    n = 64
    g = torch.Generator().manual_seed(1)
    sampler = SAMPLERS["edm"](SAMPLERS["edm"].Config(steps=24, s_churn=0.0))
    out = sample_stage(stage, ["a red circle"] * n, torch.randn(n, 3, 8, 8, generator=g), sampler=sampler,
                       guidance=GuidanceConfig(guidance_scale=1.0), generator=g).double().flatten()
    pos = out[out > 0]
    # at sigma_min the ODE marginal of a mode has std sqrt(S^2 + sigma_min^2); the posterior mean
    # shrinks deviations by S^2 / (S^2 + sigma_min^2): std S^2 / sqrt(S^2 + sigma_min^2)
    want = S**2 / math.sqrt(S**2 + 0.1**2)
    assert pos.std().item() == pytest.approx(want, rel=0.1)
    assert pos.mean().item() == pytest.approx(M, abs=0.01)
