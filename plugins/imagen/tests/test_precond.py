"""EDM and continuous-time DDPM preconditioning against the analytic formulas (NeMo's
precond.py / continuous_ddpm.py written out independently here)."""

from __future__ import annotations

import math

import pytest
import torch

from t2i_engine.diffusion.parameterization import DenoiserWrapper, training_batch
from t2i_engine.interfaces import Conditioning, DenoiserNet
from t2i_plugin_imagen.precond import ContinuousDDPMSchedule, Preconditioning, log_snr_to_time


class Probe(DenoiserNet):
    """F(x, t) = 0.3 x + t: records what the wrapper fed it."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction

    def forward(self, x_t, t, cond):
        self.seen = (x_t, t)
        return 0.3 * x_t + t.reshape(-1, 1, 1, 1).to(x_t)


def test_edm_denoiser_is_nemo_edmprecond():
    pre = Preconditioning()
    net = Probe(pre.prediction)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    got = DenoiserWrapper(net, pre.schedule())(x, sigma, Conditioning())
    s, sd = sigma.reshape(-1, 1, 1, 1), 0.5
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (sd**2 + s**2).sqrt(), sigma.log() / 4
    want = c_skip * x + c_out * (0.3 * c_in * x + c_noise.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(net.seen[1], c_noise)


def test_edm_training_sigmas_and_loss_weight():
    pre = Preconditioning()
    sigma = pre.schedule().sample_training_sigmas(40000, generator=torch.Generator().manual_seed(0))
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.03)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.03)
    x0 = torch.randn(5, 3, 4, 4)
    s = torch.tensor([0.01, 0.1, 0.5, 2.0, 40.0])
    batch = training_batch(x0, pre.schedule(), prediction=pre.prediction, weighting=pre.weighting, sigma=s)
    # NeMo: loss = lambda * ||D - x0||^2 with lambda = (s^2 + sd^2) / (s sd)^2 and D - x0 = c_out (F - F_target)
    lam, c_out = (s**2 + 0.25) / (s * 0.5) ** 2, s * 0.5 / (s**2 + 0.25).sqrt()
    torch.testing.assert_close(batch.weight, lam * c_out**2)
    torch.testing.assert_close(batch.weight, torch.ones(5))  # EDM's point: unit weight on F
    F_pred = torch.randn_like(x0)
    D = (0.25 / (s**2 + 0.25)).reshape(-1, 1, 1, 1) * (x0 + s.reshape(-1, 1, 1, 1) * batch.noise) \
        + c_out.reshape(-1, 1, 1, 1) * F_pred
    nemo = (lam * ((D - x0) ** 2).reshape(5, -1).mean(1)).mean()
    torch.testing.assert_close(batch.loss(F_pred), nemo, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_continuous_ddpm_schedule(kind):
    sched = ContinuousDDPMSchedule(kind)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    if kind == "linear":
        lam = -torch.log(torch.expm1(1e-4 + 10 * t**2))
    else:
        lam = -torch.log(torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** -2 - 1)
    sigma = sched.t_to_sigma(t)
    alpha, sigma_vp = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    torch.testing.assert_close(sigma, sigma_vp / alpha)  # x / alpha = x0 + (sigma_vp / alpha) eps
    torch.testing.assert_close(sched.sigma_to_t(sigma), lam)  # the UNet sees the log-SNR
    torch.testing.assert_close(sched.sigma_to_time(sigma), t)
    torch.testing.assert_close(log_snr_to_time(lam, kind), t)
    sig = sched.sampling_sigmas(4)
    assert sig.shape == (5,) and sig[-1] == 0 and bool((sig[:-1].diff() < 0).all())


@pytest.mark.parametrize("objective", ["eps", "x0"])
def test_continuous_ddpm_training_batch_is_nemo_q_sample(objective):
    pre = Preconditioning(kind="continuous-ddpm", objective=objective, log_snr="linear")
    sched = pre.schedule()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    sigma = sched.t_to_sigma(t).float()
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    batch = training_batch(x0, sched, prediction=pre.prediction, weighting=pre.weighting, sigma=sigma, noise=noise)
    lam = -torch.log(torch.expm1(1e-4 + 10 * t**2)).float().reshape(-1, 1, 1, 1)
    alpha, sigma_vp = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    torch.testing.assert_close(batch.net_input, alpha * x0 + sigma_vp * noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.target, noise if objective == "eps" else x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch.t, lam.reshape(-1), rtol=1e-5, atol=1e-5)
    assert bool((batch.weight == 1).all())


def test_unknown_kind():
    with pytest.raises(ValueError, match="log-SNR"):
        ContinuousDDPMSchedule("quadratic")  # type: ignore[arg-type]
