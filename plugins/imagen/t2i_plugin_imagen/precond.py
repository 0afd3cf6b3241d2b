"""Imagen's two preconditionings, expressed in the core's contracts (NeMo's
``imagen/precond.py`` and ``sampler/continuous_ddpm.py``; imagen-pytorch's ``Imagen`` and
``ElucidatedImagen``).

* EDM (Karras et al. 2022): the core's ``edm`` prediction and :class:`~t2i_engine.diffusion.schedules.EDMSchedule`
  already are NeMo's ``EDMPrecond`` (c_skip, c_out, c_in, c_noise = ln(sigma)/4, training sigmas
  ``exp(N(P_mean, P_std))``, loss weight ``(sigma^2 + sd^2) / (sigma sd)^2`` on the x0 error).
* Continuous-time DDPM (Kingma et al. 2021; Nichol & Dhariwal 2021): ``t`` uniform in [0, 1], a
  log-SNR schedule (``linear``: ``-log(expm1(1e-4 + 10 t^2))``; ``cosine``:
  ``-log(cos((t + s) / (1 + s) pi / 2)^-2 - 1)``), ``alpha^2 = sigmoid(logsnr)``,
  ``sigma_vp^2 = sigmoid(-logsnr)``, the UNet conditioned on the log-SNR, objective eps or x0.
  In the core's sigma space ``sigma = exp(-logsnr / 2)`` and ``c_in = alpha`` (the VP scaling).
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
from torch import Tensor

from t2i_engine.diffusion.parameterization import Weighting
from t2i_engine.diffusion.schedules import EDMSchedule, append_zero, log_snr_to_sigma, sigma_to_log_snr
from t2i_engine.interfaces import NoiseSchedule, Prediction

LogSNRKind = Literal["linear", "cosine"]


def log_snr(t: Tensor, kind: LogSNRKind, *, s: float = 0.008) -> Tensor:
    """The continuous DDPM log-SNR at ``t`` in [0, 1] (decreasing in t)."""
    t = t.to(torch.float64)
    if kind == "linear":
        return -torch.log(torch.expm1(1e-4 + 10 * t**2))
    if kind == "cosine":
        return -torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2) ** -2 - 1)
    raise ValueError(f"unknown log-SNR schedule {kind!r} (linear, cosine)")


def log_snr_to_time(lam: Tensor, kind: LogSNRKind, *, s: float = 0.008) -> Tensor:
    """The inverse of :func:`log_snr`."""
    lam = lam.to(torch.float64)
    if kind == "linear":  # expm1(1e-4 + 10 t^2) = exp(-lam)
        return ((torch.log1p(torch.exp(-lam)) - 1e-4) / 10).clamp(min=0).sqrt()
    if kind == "cosine":  # cos(u)^-2 - 1 = tan(u)^2 = exp(-lam)
        return torch.atan(torch.exp(-lam / 2)) * 2 / math.pi * (1 + s) - s
    raise ValueError(f"unknown log-SNR schedule {kind!r} (linear, cosine)")


class ContinuousDDPMSchedule:
    """Continuous-time DDPM seen through sigmas; the network's time input is the log-SNR (NeMo's
    ``ContinousDDPMPrecond``). Log-SNR is clipped to ``[logsnr_min, logsnr_max]`` so sigma stays
    finite in float32 (the cosine schedule reaches -74 at t = 1).

    Sampling walks ``steps`` uniform times from 1 to ``1/steps`` and ends at sigma 0 (the last step
    lands on the x0 estimate).
    """

    discrete = False
    variance_preserving = True  # sampling starts from unit noise in VP space

    def __init__(self, kind: LogSNRKind = "cosine", *, s: float = 0.008, logsnr_min: float = -15.0,
                 logsnr_max: float = 15.0) -> None:
        log_snr(torch.zeros(1), kind)  # validates kind
        self.kind, self.s = kind, s
        self.logsnr_min, self.logsnr_max = logsnr_min, logsnr_max
        self.sigma_min = math.exp(-logsnr_max / 2)
        self.sigma_max = math.exp(-logsnr_min / 2)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """``sigma(t) = exp(-logsnr(t) / 2)`` with the log-SNR clipped."""
        return log_snr_to_sigma(log_snr(t, self.kind, s=self.s).clamp(self.logsnr_min, self.logsnr_max))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The network's time input: the log-SNR ``-2 log(sigma)``."""
        return sigma_to_log_snr(sigma)

    def sigma_to_time(self, sigma: Tensor) -> Tensor:
        """The diffusion time ``t`` in [0, 1] of each sigma."""
        return log_snr_to_time(sigma_to_log_snr(sigma.to(torch.float64)), self.kind, s=self.s).clamp(0, 1)

    def sampling_sigmas(self, steps: int, *, device: torch.device | None = None) -> Tensor:
        """Sigmas at ``t = 1, 1 - 1/steps, ..., 1/steps`` and a final 0 (``steps + 1``)."""
        t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
        return append_zero(self.t_to_sigma(t)).to(device)

    def sample_training_sigmas(self, batch: int, *, generator: torch.Generator | None = None,
                               device: torch.device | None = None) -> Tensor:
        """Sigmas at ``t ~ U(0, 1)``."""
        t = torch.rand(batch, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else None)
        return self.t_to_sigma(t).to(device=device, dtype=torch.float32)


@attrs.frozen
class Preconditioning:
    """How an Imagen UNet is preconditioned and trained (NeMo's ``preconditioning_type``).

    ``edm``: EDM scalings, Karras sampling sigmas, log-normal training sigmas, EDM loss weight.
    ``continuous-ddpm``: :class:`ContinuousDDPMSchedule`, objective ``eps`` (NeMo ``noise``) or
    ``x0`` (``x_start``), plain MSE on the objective.
    """

    kind: Literal["edm", "continuous-ddpm"] = "edm"
    objective: Literal["eps", "x0"] = "eps"  # continuous-ddpm only
    log_snr: LogSNRKind = "cosine"  # continuous-ddpm only
    sigma_data: float = 0.5  # edm only
    p_mean: float = -1.2  # edm: mean of log(sigma) in training
    p_std: float = 1.2  # edm: std of log(sigma) in training
    sigma_min: float = 0.002  # edm sampling range
    sigma_max: float = 80.0
    rho: float = 7.0  # edm Karras spacing

    @property
    def prediction(self) -> Prediction:
        """What the network outputs, in the core's names."""
        return "edm" if self.kind == "edm" else self.objective

    @property
    def weighting(self) -> Weighting:
        """The core's loss weighting for :func:`~t2i_engine.diffusion.parameterization.training_batch`."""
        return "edm" if self.kind == "edm" else "uniform"

    def schedule(self) -> NoiseSchedule:
        """The core schedule this preconditioning samples and trains with."""
        if self.kind == "edm":
            return EDMSchedule(sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho,
                               sigma_data=self.sigma_data, p_mean=self.p_mean, p_std=self.p_std)
        return ContinuousDDPMSchedule(self.log_snr)
