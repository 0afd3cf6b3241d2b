"""Noise schedules, seen through sigmas (``x = x0 + sigma * eps``, Karras et al. 2022).

This module is the one place where the noise-level conversions live:

* ``alpha_bar`` (the DDPM cumulative product) and ``sigma`` are related by
  ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``;
* the log signal-to-noise ratio is ``log_snr = log(alpha_bar / (1 - alpha_bar)) = -2 log(sigma)``;
* a variance-preserving (VP) network sees ``x_vp = x / sqrt(1 + sigma^2)`` (:func:`vp_scale`).

Schedules:

* :class:`DiscreteSchedule` - DDPM-style betas on ``num_train_timesteps`` integer steps
  (linear, scaled-linear, cosine), with optional zero-terminal-SNR rescale and the timestep
  spacings of Lin et al. 2023 (Table 2): ``leading`` (with ``steps_offset``), ``trailing``,
  ``linspace``; timesteps and sigmas agree with diffusers' schedulers.
* :class:`EDMSchedule` - continuous Karras/EDM sigmas (Karras et al. 2022, eq. 5) with
  log-normal training noise.
* :class:`VPCosineSchedule` - the continuous cosine log-SNR schedule of Imagen's continuous-time
  DDPM (Nichol & Dhariwal 2021 in continuous time).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import Tensor

from t2i_engine.interfaces import NoiseSchedule

BetaSchedule = Literal["linear", "scaled_linear", "cosine", "squaredcos_cap_v2"]
Spacing = Literal["leading", "trailing", "linspace"]
Interpolation = Literal["log_linear", "linear"]

ZERO_SNR_ALPHA_BAR = 2.0**-24
"""alpha_bar used for the last timestep of a zero-terminal-SNR schedule, where sigma would be
infinite (the same value diffusers uses)."""


# ---------------------------------------------------------------------------------------------
# Conversions (the only place they are written down)
# ---------------------------------------------------------------------------------------------

def alpha_bar_to_sigma(alpha_bar: Tensor) -> Tensor:
    """``sigma = sqrt((1 - alpha_bar) / alpha_bar)``."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: Tensor) -> Tensor:
    """``alpha_bar = 1 / (1 + sigma^2)``."""
    return 1 / (1 + sigma**2)


def sigma_to_log_snr(sigma: Tensor) -> Tensor:
    """``log_snr = -2 log(sigma)``."""
    return -2 * sigma.log()


def log_snr_to_sigma(log_snr: Tensor) -> Tensor:
    """``sigma = exp(-log_snr / 2)``."""
    return (-log_snr / 2).exp()


def vp_scale(sigma: Tensor) -> Tensor:
    """The factor ``1 / sqrt(1 + sigma^2)`` that maps ``x`` to a VP network's input ``x_vp``."""
    return (1 + sigma**2).rsqrt()


def append_zero(sigmas: Tensor) -> Tensor:
    """``sigmas`` with a final 0 appended (the end of every sampling sequence)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, *, rho: float = 7.0,
                  device: torch.device | None = None) -> Tensor:
    """Karras et al. 2022 (eq. 5) noise levels: ``n`` decreasing sigmas, no final zero."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sampling_sigmas(schedule: NoiseSchedule, steps: int, *, karras: bool = False,
                    rho: float = 7.0, device: torch.device | None = None) -> Tensor:
    """The ``steps + 1`` sigmas a sampler walks for ``schedule``, optionally Karras-spaced.

    With ``karras`` the schedule's own spaced sigmas give the range (their first and last
    nonzero level, as diffusers' ``use_karras_sigmas`` does) and :func:`karras_sigmas` fills it.
    """
    sigmas = schedule.sampling_sigmas(steps, device=device)
    if karras:
        nonzero = sigmas[sigmas > 0]
        ks = karras_sigmas(steps, float(nonzero[-1]), float(nonzero[0]), rho=rho, device=device)
        sigmas = append_zero(ks) if sigmas[-1] == 0 else torch.cat([ks, sigmas[-1:].to(ks)])
    return sigmas


# ---------------------------------------------------------------------------------------------
# Discrete (DDPM) betas
# ---------------------------------------------------------------------------------------------

def cosine_alpha_bar(t: Tensor, *, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal 2021 (eq. 17) unnormalised ``f(t) = cos((t + s) / (1 + s) * pi / 2)^2``."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def make_betas(kind: BetaSchedule, num_train_timesteps: int, *, beta_start: float = 0.00085,
               beta_end: float = 0.012, max_beta: float = 0.999) -> Tensor:
    """DDPM betas ``(T,)`` in float64.

    ``linear`` (Ho et al. 2020), ``scaled_linear`` (linear in sqrt(beta), Stable Diffusion),
    ``cosine`` / ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021, betas capped at ``max_beta``;
    the second name is diffusers' spelling of the same schedule).
    """
    T = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if kind in ("cosine", "squaredcos_cap_v2"):
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = cosine_alpha_bar(t)
        return (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    raise ValueError(f"unknown beta schedule {kind!r}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023 (Algorithm 1): shift and scale sqrt(alpha_bar) so the last step has SNR 0."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def timestep_grid(steps: int, *, num_train_timesteps: int, spacing: Spacing = "leading",
                  steps_offset: int = 0) -> Tensor:
    """Decreasing (possibly fractional) sampling timesteps ``(steps,)``, float64, as diffusers.

    ``leading``: ``arange(steps) * (T // steps) + steps_offset``; ``trailing``:
    ``round(arange(T, 0, -T / steps)) - 1``; ``linspace``: ``linspace(0, T - 1, steps)``.
    """
    T = num_train_timesteps
    if spacing == "leading":
        t = torch.arange(steps, dtype=torch.float64) * (T // steps) + steps_offset
        return t.flip(0)
    if spacing == "trailing":
        return torch.arange(T, 0, -T / steps, dtype=torch.float64).round()[:steps] - 1
    if spacing == "linspace":
        return torch.linspace(0, T - 1, steps, dtype=torch.float64).flip(0)
    raise ValueError(f"unknown timestep spacing {spacing!r}")


def _draw_device(generator: torch.Generator | None) -> torch.device | None:
    """Random numbers are drawn where the generator lives (PyTorch refuses a CUDA generator for
    a CPU tensor); the result is moved to the requested device afterwards."""
    return generator.device if generator is not None else None


class DiscreteSchedule:
    """A DDPM schedule on ``T`` integer timesteps, exposed as sigmas.

    Between integer timesteps sigma is interpolated log-linearly (``interpolation="log_linear"``,
    k-diffusion's and diffusers' ``_sigma_to_t``) or linearly (``"linear"``, the ``np.interp`` of
    diffusers' Euler-family ``set_timesteps``); :meth:`sigma_to_t` is the exact inverse of
    :meth:`t_to_sigma` in either mode, so fractional timesteps reach the network consistently.

    ``scheduler_config`` is the diffusers ``scheduler_config.json`` the schedule was read from
    (a model loaded from a diffusers folder), or None; samplers derive their default timestep
    grid from it (:mod:`t2i_engine.diffusion.grids`).
    """

    discrete = True

    def __init__(self, alphas_cumprod: Tensor, *, spacing: Spacing = "leading", steps_offset: int = 0,
                 interpolation: Interpolation = "log_linear",
                 scheduler_config: dict[str, Any] | None = None) -> None:
        ab = alphas_cumprod.to(torch.float64).clamp(min=ZERO_SNR_ALPHA_BAR)
        self.alphas_cumprod = ab  # (T,)
        self.sigmas = alpha_bar_to_sigma(ab)  # (T,) increasing with t
        self.log_sigmas = self.sigmas.log()
        self.num_train_timesteps = int(ab.shape[0])
        self.spacing: Spacing = spacing
        self.steps_offset = steps_offset
        self.interpolation: Interpolation = interpolation
        self.scheduler_config = scheduler_config
        self.definition: dict[str, Any] | None = None  # set by from_betas
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    @classmethod
    def from_betas(cls, kind: BetaSchedule, *, num_train_timesteps: int = 1000,
                   beta_start: float = 0.00085, beta_end: float = 0.012,
                   rescale_zero_snr: bool = False, spacing: Spacing = "leading",
                   steps_offset: int = 0, scheduler_config: dict[str, Any] | None = None) -> DiscreteSchedule:
        """Build from a named beta schedule (see :func:`make_betas`)."""
        betas = make_betas(kind, num_train_timesteps, beta_start=beta_start, beta_end=beta_end)
        if rescale_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        schedule = cls(torch.cumprod(1 - betas, 0), spacing=spacing, steps_offset=steps_offset,
                       scheduler_config=scheduler_config)
        # what it was built from, in diffusers' names (so a model can export the schedule it runs)
        schedule.definition = {
            "beta_schedule": "squaredcos_cap_v2" if kind == "cosine" else kind, "beta_start": beta_start,
            "beta_end": beta_end, "num_train_timesteps": num_train_timesteps,
            "rescale_betas_zero_snr": rescale_zero_snr, "timestep_spacing": spacing, "steps_offset": steps_offset}
        return schedule

    def with_interpolation(self, interpolation: Interpolation) -> DiscreteSchedule:
        """The same schedule with another interpolation of sigma between integer timesteps."""
        if interpolation == self.interpolation:
            return self
        other = copy.copy(self)
        other.interpolation = interpolation
        return other

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at (fractional) timesteps ``t``, interpolated between integer steps."""
        t = t.to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        if self.interpolation == "linear":
            s = self.sigmas.to(t.device)
            return (1 - w) * s[low] + w * s[low + 1]
        ls = self.log_sigmas.to(t.device)
        return ((1 - w) * ls[low] + w * ls[low + 1]).exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The (fractional) timestep of each sigma, clamped to ``[0, T - 1]``."""
        linear = self.interpolation == "linear"
        table = (self.sigmas if linear else self.log_sigmas).to(sigma.device)
        value = sigma.to(torch.float64).clamp(min=1e-10)
        value = value if linear else value.log()
        low = (torch.searchsorted(table, value, right=True) - 1).clamp(0, self.num_train_timesteps - 2)
        w = ((table[low] - value) / (table[low] - table[low + 1])).clamp(0, 1)
        return (low + w).to(sigma.dtype)

    def timesteps(self, steps: int) -> Tensor:
        """The sampling timesteps ``(steps,)`` for this schedule's spacing."""
        return timestep_grid(steps, num_train_timesteps=self.num_train_timesteps,
                             spacing=self.spacing, steps_offset=self.steps_offset)

    def sampling_sigmas(self, steps: int, *, device: torch.device | None = None) -> Tensor:
        """Decreasing sigmas at the spaced timesteps, with a final 0 (``steps + 1``)."""
        return append_zero(self.t_to_sigma(self.timesteps(steps))).to(device)

    def sample_training_sigmas(self, batch: int, *, generator: torch.Generator | None = None,
                               device: torch.device | None = None) -> Tensor:
        """Sigmas of uniformly drawn integer timesteps ``(B,)`` (DDPM training)."""
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=_draw_device(generator))
        return self.sigmas[t.cpu()].to(device=device, dtype=torch.float32)


class EDMSchedule:
    """Continuous EDM schedule (Karras et al. 2022): Karras sigmas, log-normal training noise.

    The network's time input is EDM's ``c_noise = log(sigma) / 4``.
    """

    discrete = False

    def __init__(self, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def sampling_sigmas(self, steps: int, *, device: torch.device | None = None) -> Tensor:
        """Karras sigmas from ``sigma_max`` to ``sigma_min`` and a final 0 (``steps + 1``)."""
        return append_zero(karras_sigmas(steps, self.sigma_min, self.sigma_max, rho=self.rho)).to(device)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """EDM's ``c_noise = log(sigma) / 4``."""
        return sigma.log() / 4

    def sample_training_sigmas(self, batch: int, *, generator: torch.Generator | None = None,
                               device: torch.device | None = None) -> Tensor:
        """``sigma = exp(P_mean + P_std * n)``, ``n ~ N(0, 1)`` (EDM Table 1)."""
        n = torch.randn(batch, generator=generator, device=_draw_device(generator))
        return (self.p_mean + self.p_std * n).exp().to(device)


class VPCosineSchedule:
    """Continuous-time cosine schedule (Imagen's continuous DDPM, Nichol & Dhariwal's cosine).

    ``alpha_bar(t) = cos((t + s) / (1 + s) * pi / 2)^2`` for ``t`` in [0, 1], hence
    ``sigma(t) = tan((t + s) / (1 + s) * pi / 2)``; log-SNR is clipped to
    ``[logsnr_min, logsnr_max]``. The network's time input is ``t``.
    """

    discrete = False

    def __init__(self, *, s: float = 0.008, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> None:
        self.s = s
        self.sigma_min = math.exp(-logsnr_max / 2)
        self.sigma_max = math.exp(-logsnr_min / 2)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """``sigma(t) = tan((t + s) / (1 + s) * pi / 2)``, clipped to the schedule's range."""
        sigma = torch.tan((t + self.s) / (1 + self.s) * math.pi / 2)
        return sigma.clamp(self.sigma_min, self.sigma_max)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Inverse of :meth:`t_to_sigma`."""
        return torch.atan(sigma) * 2 / math.pi * (1 + self.s) - self.s

    def sampling_sigmas(self, steps: int, *, device: torch.device | None = None) -> Tensor:
        """Sigmas at ``steps`` uniformly spaced times from ``t(sigma_max)`` to ``t(sigma_min)``."""
        ends = self.sigma_to_t(torch.tensor([self.sigma_max, self.sigma_min], dtype=torch.float64))
        t = torch.linspace(float(ends[0]), float(ends[1]), steps, dtype=torch.float64)
        return append_zero(self.t_to_sigma(t)).to(device)

    def sample_training_sigmas(self, batch: int, *, generator: torch.Generator | None = None,
                               device: torch.device | None = None) -> Tensor:
        """Sigmas at ``t ~ U(0, 1)``."""
        t = torch.rand(batch, generator=generator, dtype=torch.float64, device=_draw_device(generator))
        return self.t_to_sigma(t).to(device=device, dtype=torch.float32)


__all__ = [
    "DiscreteSchedule", "EDMSchedule", "VPCosineSchedule", "alpha_bar_to_sigma", "append_zero",
    "cosine_alpha_bar", "karras_sigmas", "log_snr_to_sigma", "make_betas",
    "rescale_zero_terminal_snr", "sampling_sigmas", "sigma_to_alpha_bar", "sigma_to_log_snr", "timestep_grid",
    "vp_scale",
]
