"""Parameterizations: round trips, the denoiser wrapper, training targets and loss weights."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.diffusion.parameterization import (
    DenoiserWrapper, from_x0, loss_weight, offset_noise, to_x0, training_batch,
)
from t2i_engine.diffusion.schedules import DiscreteSchedule, EDMSchedule
from t2i_engine.interfaces import PREDICTIONS, Conditioning, DenoiserNet

diffusers = pytest.importorskip("diffusers")
G = torch.Generator().manual_seed(0)
X0 = torch.randn(4, 3, 5, 5, generator=G, dtype=torch.float64)
NOISE = torch.randn(4, 3, 5, 5, generator=G, dtype=torch.float64)
SIGMA = torch.tensor([0.03, 0.7, 4.0, 60.0], dtype=torch.float64)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_round_trip(prediction):
    x = X0 + SIGMA.reshape(-1, 1, 1, 1) * NOISE
    out = from_x0(X0, x, SIGMA, prediction=prediction)
    torch.testing.assert_close(to_x0(out, x, SIGMA, prediction=prediction), X0)


def test_eps_v_x0_targets_match_definitions():
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = DiscreteSchedule(ref.alphas_cumprod)
    t = torch.tensor([3, 100, 500, 999])
    sigma = s.sigmas[t]
    x = X0 + sigma.reshape(-1, 1, 1, 1) * NOISE
    torch.testing.assert_close(from_x0(X0, x, sigma, prediction="eps"), NOISE)
    torch.testing.assert_close(from_x0(X0, x, sigma, prediction="x0"), X0)
    v_ref = ref.get_velocity(X0, NOISE, t)  # sqrt(ab) eps - sqrt(1 - ab) x0
    torch.testing.assert_close(from_x0(X0, x, sigma, prediction="v"), v_ref, rtol=1e-5, atol=1e-5)
    # eps -> v -> x0 via the x0 estimate
    v = from_x0(to_x0(NOISE, x, sigma, prediction="eps"), x, sigma, prediction="v")
    torch.testing.assert_close(to_x0(v, x, sigma, prediction="v"), X0)


class Recorder(DenoiserNet):
    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction
        self.seen = None

    def forward(self, x_t, t, cond):
        self.seen = (x_t, t)
        return 0.5 * x_t + t.reshape(-1, 1, 1, 1) / 1000


def test_wrapper_v_matches_diffusers_formula():
    s = DiscreteSchedule.from_betas("scaled_linear")
    net = Recorder("v")
    D = DenoiserWrapper(net, s).bind(Conditioning())
    t = torch.tensor([1.0, 250.0, 500.0, 981.0], dtype=torch.float64)
    sigma = s.t_to_sigma(t)
    x = X0 + sigma.reshape(-1, 1, 1, 1) * NOISE
    x0 = D(x, sigma)
    sg = sigma.reshape(-1, 1, 1, 1)
    x_in = x / (sg**2 + 1) ** 0.5  # diffusers' EulerDiscreteScheduler.scale_model_input
    torch.testing.assert_close(net.seen[0], x_in)
    torch.testing.assert_close(net.seen[1], t)
    v = 0.5 * x_in + t.reshape(-1, 1, 1, 1) / 1000
    expected = v * (-sg / (sg**2 + 1) ** 0.5) + x / (sg**2 + 1)  # diffusers' v -> x0
    torch.testing.assert_close(x0, expected)


def test_wrapper_edm_preconditioning():
    e = EDMSchedule(sigma_data=0.5)
    net = Recorder("edm")
    x = X0 + SIGMA.reshape(-1, 1, 1, 1) * NOISE
    x0 = DenoiserWrapper(net, e)(x, SIGMA, Conditioning())
    sg, sd = SIGMA.reshape(-1, 1, 1, 1), 0.5
    c_in = 1 / (sg**2 + sd**2) ** 0.5
    torch.testing.assert_close(net.seen[0], x * c_in)
    torch.testing.assert_close(net.seen[1], SIGMA.log() / 4)
    F = 0.5 * x * c_in + (SIGMA.log() / 4).reshape(-1, 1, 1, 1) / 1000
    expected = sd**2 / (sg**2 + sd**2) * x + sg * sd / (sg**2 + sd**2) ** 0.5 * F
    torch.testing.assert_close(x0, expected)


def test_min_snr_weights_as_hang_et_al():
    snr = SIGMA**-2
    gamma = 5.0
    w_eps = loss_weight(SIGMA, prediction="eps", weighting="min_snr", min_snr_gamma=gamma)
    w_v = loss_weight(SIGMA, prediction="v", weighting="min_snr", min_snr_gamma=gamma)
    w_x0 = loss_weight(SIGMA, prediction="x0", weighting="min_snr", min_snr_gamma=gamma)
    torch.testing.assert_close(w_eps, snr.clamp(max=gamma) / snr)
    torch.testing.assert_close(w_v, snr.clamp(max=gamma) / (snr + 1))
    torch.testing.assert_close(w_x0, snr.clamp(max=gamma))
    torch.testing.assert_close(loss_weight(SIGMA, prediction="eps"), torch.ones_like(SIGMA))


def test_edm_weight():
    torch.testing.assert_close(loss_weight(SIGMA, prediction="edm", weighting="edm"), torch.ones_like(SIGMA))
    lam = (SIGMA**2 + 0.25) / (SIGMA * 0.5) ** 2
    torch.testing.assert_close(loss_weight(SIGMA, prediction="eps", weighting="edm"), lam * SIGMA**2)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_batch_target_recovers_x0(prediction):
    s = EDMSchedule() if prediction == "edm" else DiscreteSchedule.from_betas("scaled_linear")
    b = training_batch(X0, s, prediction=prediction, generator=torch.Generator().manual_seed(1),
                       weighting="min_snr")
    sg = b.sigma.reshape(-1, 1, 1, 1)
    x = X0 + sg * b.noise
    torch.testing.assert_close(to_x0(b.target, x, b.sigma, prediction=prediction, sigma_data=0.5), X0)
    torch.testing.assert_close(b.t, s.sigma_to_t(b.sigma))
    c_in = (1 / (sg**2 + 0.25) ** 0.5) if prediction == "edm" else 1 / (sg**2 + 1) ** 0.5
    torch.testing.assert_close(b.net_input, x * c_in)
    assert b.weight.shape == (4,) and float(b.loss(b.target)) == 0.0
    assert float(b.loss(b.target + 1)) == pytest.approx(float(b.weight.mean()))


def test_offset_noise_adds_channel_offsets():
    n = offset_noise((64, 4, 16, 16), strength=0.5, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(0))
    chan_means = n.mean(dim=(2, 3))  # (B, C): variance 1/256 + 0.25
    assert abs(float(chan_means.var()) - (1 / 256 + 0.25)) < 0.05
    plain = offset_noise((64, 4, 16, 16), strength=0.0, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    assert abs(float(plain.mean(dim=(2, 3)).var()) - 1 / 256) < 1e-3


def test_half_precision_input_keeps_time_precise():
    s = DiscreteSchedule.from_betas("scaled_linear")
    net = Recorder("eps")
    t = torch.tensor([981.0, 377.0])
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).half()
    out = DenoiserWrapper(net, s)(x, s.t_to_sigma(t).float(), Conditioning())
    assert out.dtype == torch.float16 and net.seen[0].dtype == torch.float16
    torch.testing.assert_close(net.seen[1], t, atol=1e-3, rtol=0)
