"""Parameterizations: from any :class:`~t2i_engine.interfaces.DenoiserNet` to ``D(x, sigma) -> x0``.

Every prediction type is written in the preconditioned form of Karras et al. 2022 (eq. 7),

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, t(sigma)),

so one wrapper serves them all and samplers never branch on the prediction:

========  ===========================  ==============================  ======================
output    c_skip                       c_out                           c_in
========  ===========================  ==============================  ======================
eps       1                            -sigma                          1 / sqrt(1 + sigma^2)
v         1 / (1 + sigma^2)            -sigma / sqrt(1 + sigma^2)      1 / sqrt(1 + sigma^2)
x0        0                            1                               1 / sqrt(1 + sigma^2)
edm       sd^2 / (sigma^2 + sd^2)      sigma sd / sqrt(sigma^2+sd^2)   1 / sqrt(sigma^2 + sd^2)
========  ===========================  ==============================  ======================

(eps/v/x0 are EDM's forms with ``sigma_data = 1``; ``c_in`` is the VP scaling, so a DDPM network
sees ``x_vp = x / sqrt(1 + sigma^2)``.) ``t(sigma)`` is the schedule's :meth:`sigma_to_t`.

The same coefficients give training targets, ``F_target = (x0 - c_skip x) / c_out``, and the
loss weights: uniform, min-SNR-gamma (Hang et al. 2023) and EDM's lambda, all expressed as a
weight on the x0 error times ``c_out^2`` so they apply to any prediction type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from t2i_engine.diffusion.schedules import vp_scale
from t2i_engine.interfaces import Conditioning, DenoiserNet, NoiseSchedule, Prediction

Weighting = Literal["uniform", "min_snr", "edm"]


def _bcast(sigma: Tensor, x: Tensor) -> Tensor:
    """``sigma`` as ``(B,)`` and reshaped to broadcast against ``x`` ``(B, 1, ..., 1)``."""
    sigma = sigma.to(dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def scalings(prediction: Prediction, sigma: Tensor, *,
             sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in)`` for ``prediction`` at ``sigma`` (any shape, elementwise)."""
    if prediction == "edm":
        denom = sigma**2 + sigma_data**2
        return sigma_data**2 / denom, sigma * sigma_data * denom.rsqrt(), denom.rsqrt()
    c_in = vp_scale(sigma)
    one = torch.ones_like(sigma)
    if prediction == "eps":
        return one, -sigma, c_in
    if prediction == "v":
        return c_in**2, -sigma * c_in, c_in
    if prediction == "x0":
        return torch.zeros_like(sigma), one, c_in
    raise ValueError(f"unknown prediction type {prediction!r}")


def to_x0(output: Tensor, x: Tensor, sigma: Tensor, *, prediction: Prediction,
          sigma_data: float = 0.5) -> Tensor:
    """Convert a network output at ``(x, sigma)`` (``x`` in sigma space) to the x0 estimate."""
    c_skip, c_out, _ = scalings(prediction, _bcast(sigma, x), sigma_data=sigma_data)
    return c_skip * x + c_out * output


def from_x0(x0: Tensor, x: Tensor, sigma: Tensor, *, prediction: Prediction,
            sigma_data: float = 0.5) -> Tensor:
    """The network output that :func:`to_x0` maps to ``x0`` (the training target)."""
    c_skip, c_out, _ = scalings(prediction, _bcast(sigma, x), sigma_data=sigma_data)
    return (x0 - c_skip * x) / c_out


def _sigma_data(schedule: NoiseSchedule) -> float:
    return float(getattr(schedule, "sigma_data", 0.5))


class DenoiserWrapper:
    """Turns a :class:`DenoiserNet` and its schedule into ``D(x, sigma, cond) -> x0``.

    ``x`` is in sigma space (``x0 + sigma * eps``); the wrapper scales it by ``c_in``, maps sigma
    to the network's time input with ``schedule.sigma_to_t`` (rounded to integers when
    ``round_t``, as diffusers' DPM-Solver does with Karras sigmas) and converts the output.
    Bind a conditioning with :meth:`bind` to get the sampler-space ``model(x, sigma)``.
    """

    def __init__(self, net: DenoiserNet, schedule: NoiseSchedule, *, round_t: bool = False) -> None:
        self.net, self.schedule, self.round_t = net, schedule, round_t
        self.prediction: Prediction = net.prediction
        self.sigma_data = _sigma_data(schedule)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """``x`` ``(B, ...)``, ``sigma`` scalar or ``(B,)`` -> x0 estimate ``(B, ...)``."""
        flat = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma  # (B,), caller's precision
        t = self.schedule.sigma_to_t(flat)  # before any cast to a half-precision x
        if self.round_t:
            t = t.round()
        s = flat.to(device=x.device, dtype=torch.promote_types(flat.dtype, torch.float32))
        s = s.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        # scalings in float32 or better, then in x's dtype (a bf16 sigma is off by up to 0.4%)
        c_skip, c_out, c_in = (c.to(x.dtype) for c in scalings(self.prediction, s, sigma_data=self.sigma_data))
        out = self.net(x * c_in, t, cond)
        return c_skip * x + c_out * out.to(x.dtype)

    def bind(self, cond: Conditioning) -> BoundDenoiser:
        """The sampler-space denoiser ``model(x, sigma)`` for a fixed conditioning."""
        return BoundDenoiser(self, cond)


@dataclass(frozen=True)
class BoundDenoiser:
    """``model(x, sigma) -> x0`` with its conditioning fixed (what samplers call)."""

    inner: DenoiserWrapper
    cond: Conditioning

    @property
    def prediction(self) -> Prediction:
        """The network's output type (samplers that combine raw outputs read it)."""
        return self.inner.prediction

    @property
    def sigma_data(self) -> float:
        """The schedule's data std (EDM scalings)."""
        return self.inner.sigma_data

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.inner(x, sigma, self.cond)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def loss_weight(sigma: Tensor, *, prediction: Prediction, weighting: Weighting = "uniform",
                min_snr_gamma: float = 5.0, sigma_data: float = 0.5) -> Tensor:
    """Per-sample weight ``(B,)`` on the mean squared error of the network output.

    ``uniform``: 1 (plain MSE on the output, as DDPM/SD train). ``min_snr``: x0-error weight
    ``min(SNR, gamma)`` (Hang et al. 2023), i.e. ``min(SNR, gamma) / SNR`` for eps and
    ``min(SNR, gamma) / (SNR + 1)`` for v. ``edm``: x0-error weight
    ``(sigma^2 + sd^2) / (sigma sd)^2`` (Karras et al. 2022, Table 1), which is 1 for EDM outputs.
    """
    if weighting == "uniform":
        return torch.ones_like(sigma)
    _, c_out, _ = scalings(prediction, sigma, sigma_data=sigma_data)
    if weighting == "min_snr":
        x0_weight = (sigma**-2).clamp(max=min_snr_gamma)
    elif weighting == "edm":
        x0_weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}")
    return x0_weight * c_out**2


def offset_noise(shape: torch.Size | tuple[int, ...], *, strength: float, dtype: torch.dtype,
                 device: torch.device | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise plus ``strength`` times a per-channel constant (offset noise, Guttenberg 2023)."""
    noise = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if strength:
        per_channel = torch.randn((*shape[:2], *([1] * (len(shape) - 2))), generator=generator,
                                  dtype=dtype, device=device)  # (B, C, 1, 1)
        noise = noise + strength * per_channel
    return noise


@dataclass
class TrainingBatch:
    """What one training step needs: feed ``net(net_input, t, cond)``, regress ``target``."""

    net_input: Tensor  # (B, C, H, W) c_in * (x0 + sigma * noise)
    t: Tensor  # (B,) the network's time input
    target: Tensor  # (B, C, H, W) the output that reproduces x0 exactly
    weight: Tensor  # (B,) per-sample loss weight
    sigma: Tensor  # (B,)
    noise: Tensor  # (B, C, H, W)

    def loss(self, output: Tensor) -> Tensor:
        """Weighted mean squared error of the network ``output`` (a scalar)."""
        err = (output.float() - self.target.float()) ** 2
        per_sample = err.reshape(err.shape[0], -1).mean(1)  # (B,)
        return (self.weight.float() * per_sample).mean()


def training_batch(x0: Tensor, schedule: NoiseSchedule, *, prediction: Prediction,
                   generator: torch.Generator | None = None, weighting: Weighting = "uniform",
                   min_snr_gamma: float = 5.0, offset_noise_strength: float = 0.0,
                   sigma: Tensor | None = None, noise: Tensor | None = None) -> TrainingBatch:
    """Noise a clean batch ``x0`` ``(B, ...)`` as the schedule trains and give the target.

    ``sigma`` and ``noise`` are drawn (from ``generator``) unless given.
    """
    B = x0.shape[0]
    if sigma is None:
        sigma = schedule.sample_training_sigmas(B, generator=generator, device=x0.device)
    sigma = sigma.to(device=x0.device, dtype=x0.dtype)
    if noise is None:
        noise = offset_noise(x0.shape, strength=offset_noise_strength, dtype=x0.dtype,
                             device=x0.device, generator=generator)
    sd = _sigma_data(schedule)
    s = _bcast(sigma, x0)
    x = x0 + s * noise
    _, _, c_in = scalings(prediction, s, sigma_data=sd)
    return TrainingBatch(
        net_input=x * c_in,
        t=schedule.sigma_to_t(sigma),
        target=from_x0(x0, x, sigma, prediction=prediction, sigma_data=sd),
        weight=loss_weight(sigma, prediction=prediction, weighting=weighting,
                           min_snr_gamma=min_snr_gamma, sigma_data=sd),
        sigma=sigma,
        noise=noise,
    )


__all__ = [
    "BoundDenoiser", "DenoiserWrapper", "TrainingBatch", "Weighting", "from_x0", "loss_weight",
    "offset_noise", "scalings", "to_x0", "training_batch",
]
