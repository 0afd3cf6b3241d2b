"""Noise schedules: conversions (round trips), betas and spacing against diffusers."""

from __future__ import annotations

import math

import pytest
import torch

from t2i_engine.diffusion import schedules as sch
from t2i_engine.diffusion.schedules import DiscreteSchedule, EDMSchedule, VPCosineSchedule

diffusers = pytest.importorskip("diffusers")


def test_conversion_round_trips():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    ab = sch.sigma_to_alpha_bar(sigma)
    torch.testing.assert_close(sch.alpha_bar_to_sigma(ab), sigma)
    torch.testing.assert_close(sch.log_snr_to_sigma(sch.sigma_to_log_snr(sigma)), sigma)
    torch.testing.assert_close(sch.sigma_to_log_snr(sigma), (ab / (1 - ab)).log())
    torch.testing.assert_close(sch.vp_scale(sigma) ** 2, ab)


@pytest.mark.parametrize("kind,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                            ("squaredcos_cap_v2", 0.0, 0.0)])
def test_betas_match_diffusers(kind, start, end):
    ref = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=start, beta_end=end)
    ours = sch.make_betas(kind, 1000, beta_start=start, beta_end=end)
    torch.testing.assert_close(ours.float(), ref.betas, rtol=1e-5, atol=1e-7)


def test_cosine_alpha_bar_is_nichol_dhariwal():
    s = DiscreteSchedule.from_betas("cosine", num_train_timesteps=1000)
    t = torch.arange(1, 1001, dtype=torch.float64)
    f = torch.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(s.alphas_cumprod[:900], f[:900])  # before the 0.999 beta cap bites


def test_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = sch.make_betas("scaled_linear", 1000)
    ours = sch.rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(ours, rescale_zero_terminal_snr(betas.clone()))
    assert float(torch.cumprod(1 - ours, 0)[-1]) == pytest.approx(0, abs=1e-12)
    s = DiscreteSchedule.from_betas("scaled_linear", rescale_zero_snr=True, spacing="trailing")
    assert s.sigma_max == pytest.approx(math.sqrt((1 - sch.ZERO_SNR_ALPHA_BAR) / sch.ZERO_SNR_ALPHA_BAR))


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 7, 10, 30, 1000])
def test_timesteps_and_sigmas_match_diffusers(spacing, offset, steps):
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    s = DiscreteSchedule(ref.alphas_cumprod, spacing=spacing, steps_offset=offset)
    torch.testing.assert_close(s.timesteps(steps).float(), ref.timesteps)
    # diffusers interpolates sigma linearly in t, we log-linearly: equal at integer timesteps
    tol = 1e-6 if spacing != "linspace" else 2e-2
    torch.testing.assert_close(s.sampling_sigmas(steps).float(), ref.sigmas, rtol=tol, atol=1e-6)


def test_karras_sigmas_match_diffusers():
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, steps_offset=1, use_karras_sigmas=True,
                                           timestep_spacing="leading")
    ref.set_timesteps(12)
    s = DiscreteSchedule(ref.alphas_cumprod, steps_offset=1)
    sigmas = sch.sampling_sigmas(s, 12, karras=True)
    torch.testing.assert_close(sigmas.float(), ref.sigmas, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.sigma_to_t(sigmas[:-1]).float(), ref.timesteps, rtol=1e-5, atol=1e-3)


def test_karras_formula():
    k = sch.karras_sigmas(5, 0.1, 10.0, rho=1.0)
    torch.testing.assert_close(k, torch.linspace(10.0, 0.1, 5, dtype=torch.float64))
    k7 = sch.karras_sigmas(9, 0.002, 80.0)
    assert float(k7[0]) == pytest.approx(80.0) and float(k7[-1]) == pytest.approx(0.002)
    assert bool((k7[1:] < k7[:-1]).all())


def test_discrete_t_sigma_round_trip():
    s = DiscreteSchedule.from_betas("scaled_linear")
    t = torch.tensor([0.0, 0.25, 1.0, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t)
    sigma = torch.tensor([0.03, 0.5, 3.0, 14.0], dtype=torch.float64)
    torch.testing.assert_close(s.t_to_sigma(s.sigma_to_t(sigma)), sigma)
    torch.testing.assert_close(s.t_to_sigma(torch.arange(1000.0)), s.sigmas)


def test_training_sigmas():
    s = DiscreteSchedule.from_betas("scaled_linear")
    sig = s.sample_training_sigmas(256, generator=torch.Generator().manual_seed(0))
    t = s.sigma_to_t(sig.double())
    torch.testing.assert_close(t, t.round(), atol=1e-3, rtol=0)
    e = EDMSchedule()
    log_sig = e.sample_training_sigmas(20000, generator=torch.Generator().manual_seed(0)).log()
    assert abs(float(log_sig.mean()) + 1.2) < 0.05 and abs(float(log_sig.std()) - 1.2) < 0.05
    v = VPCosineSchedule()
    vs = v.sample_training_sigmas(100, generator=torch.Generator().manual_seed(0))
    assert bool(((vs >= v.sigma_min * 0.999) & (vs <= v.sigma_max * 1.001)).all())


def test_edm_schedule():
    e = EDMSchedule(sigma_min=0.002, sigma_max=80.0)
    sig = e.sampling_sigmas(10)
    assert sig.shape == (11,) and float(sig[-1]) == 0
    torch.testing.assert_close(sig[:-1], sch.karras_sigmas(10, 0.002, 80.0))
    torch.testing.assert_close(e.sigma_to_t(torch.tensor([1.0, math.e**4])), torch.tensor([0.0, 1.0]))


def test_vp_cosine_schedule():
    v = VPCosineSchedule(s=0.008)
    t = torch.linspace(0.05, 0.95, 10, dtype=torch.float64)
    sigma = v.t_to_sigma(t)
    torch.testing.assert_close(v.sigma_to_t(sigma), t)
    ab = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(sch.sigma_to_alpha_bar(sigma), ab)
    sig = v.sampling_sigmas(8)
    assert sig.shape == (9,) and bool((sig[1:] < sig[:-1]).all())
    assert float(sig[0]) == pytest.approx(v.sigma_max) and float(sig[-2]) == pytest.approx(v.sigma_min)
