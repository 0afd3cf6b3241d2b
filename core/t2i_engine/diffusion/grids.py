"""Timestep grids as diffusers' schedulers compute them, and the sampling plan of one run.

Each diffusers scheduler class spaces its timesteps by its own formula (the spacings are named
after Lin et al. 2023, Table 2), so the same model and step count give different grids:

==========  ==========================================  ============================================
family      classes                                     ``leading`` / ``linspace`` / ``trailing``
==========  ==========================================  ============================================
``ddim``    DDIM, DDPM, PNDM                             ``arange(n) * (T // n) + offset`` /
                                                        ``round(linspace(0, T - 1, n))`` /
                                                        ``round(arange(T, 0, -T / n)) - 1``
``k``       Euler, Euler ancestral, Heun, LMS            as ``ddim``, but ``linspace`` keeps
                                                        fractional (float32) timesteps and sigma is
                                                        interpolated linearly in ``t``
``dpm``     DPMSolverMultistep                           ``arange(n + 1) * (T // (n + 1))`` and
                                                        ``round(linspace(0, T - 1, n + 1))``, both
                                                        without their last (smallest) entry
==========  ==========================================  ============================================

A model read from a diffusers folder carries that folder's ``scheduler_config.json``
(``DiscreteSchedule.scheduler_config``). A sampler then uses, by default, the grid diffusers uses
after ``<Scheduler>.from_config(that config)`` for the sampler's scheduler class
(:data:`SAMPLER_SCHEDULERS`): a key present in the file is used, an absent key takes that class's
default (:data:`SCHEDULER_DEFAULTS`), as diffusers' ``from_config`` does. Keys that change the
computation and that the engine cannot reproduce are refused with a ``ConfigError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import Tensor

from t2i_engine.diffusion.schedules import DiscreteSchedule, Spacing, karras_sigmas, sampling_sigmas
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import NoiseSchedule

Family = Literal["ddim", "k", "dpm"]
FinalSigma = Literal["zero", "sigma_min"]

SAMPLER_SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "plms": "PNDMScheduler", "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
}
"""The diffusers scheduler class whose grid each built-in sampler reproduces."""

_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None}
_SIGMA_KINDS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}

SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {**_BETAS, "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
                      "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False,
                      "rescale_betas_zero_snr": False},
    "PNDMScheduler": {**_BETAS, "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": False,
                      "skip_prk_steps": False},
    "DDPMScheduler": {**_BETAS, "timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True,
                      "clip_sample_range": 1.0, "thresholding": False, "variance_type": "fixed_small",
                      "rescale_betas_zero_snr": False},
    "EulerDiscreteScheduler": {**_BETAS, "timestep_spacing": "linspace", "steps_offset": 0,
                               "interpolation_type": "linear", **_SIGMA_KINDS, "sigma_min": None, "sigma_max": None,
                               "timestep_type": "discrete", "final_sigmas_type": "zero",
                               "rescale_betas_zero_snr": False},
    "EulerAncestralDiscreteScheduler": {**_BETAS, "timestep_spacing": "linspace", "steps_offset": 0,
                                        "rescale_betas_zero_snr": False},
    "HeunDiscreteScheduler": {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "linspace",
                              "steps_offset": 0, **_SIGMA_KINDS, "clip_sample": False, "clip_sample_range": 1.0},
    "LMSDiscreteScheduler": {**_BETAS, "timestep_spacing": "linspace", "steps_offset": 0, **_SIGMA_KINDS},
    "DPMSolverMultistepScheduler": {**_BETAS, "timestep_spacing": "linspace", "steps_offset": 0, **_SIGMA_KINDS,
                                    "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
                                    "lambda_min_clipped": -math.inf, "thresholding": False, "variance_type": None,
                                    "lower_order_final": True, "euler_at_final": False,
                                    "rescale_betas_zero_snr": False},
}
"""For each class, the ``__init__`` defaults of the config keys the engine reads (diffusers 0.42)."""

_FAMILY: dict[str, Family] = {"DDIMScheduler": "ddim", "PNDMScheduler": "ddim", "DDPMScheduler": "ddim",
                              "DPMSolverMultistepScheduler": "dpm"}

# keys whose only supported value is their (falsy) default -> what they would switch on
_UNSUPPORTED: dict[str, str] = {
    "trained_betas": "explicit betas",
    "thresholding": "diffusers' dynamic thresholding",
    "use_exponential_sigmas": "exponential sigmas",
    "use_beta_sigmas": "beta sigmas",
    "use_lu_lambdas": "Lu's uniform-lambda steps",
    "use_flow_sigmas": "flow-matching sigmas",
}


def resolve_config(class_name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The values ``<class_name>.from_config(config)`` uses for the keys the engine reads: the
    file's value where the key is present, else the class's default."""
    return {k: config.get(k, default) for k, default in SCHEDULER_DEFAULTS[class_name].items()}


def betas_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` and
    ``rescale_betas_zero_snr`` of a diffusers scheduler config, absent keys taking the defaults
    of its own ``_class_name`` (diffusers' common defaults for other classes).

    A config with explicit ``trained_betas`` is a ConfigError (the engine builds betas by name).
    """
    defaults = {**_BETAS, "rescale_betas_zero_snr": False,
                **SCHEDULER_DEFAULTS.get(str(config.get("_class_name")), {})}
    if config.get("trained_betas") is not None:
        raise ConfigError("scheduler config: 'trained_betas' (explicit betas) is not supported; "
                          "give beta_schedule, beta_start and beta_end instead")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr")
    return {k: config.get(k, defaults[k]) for k in keys}


def diffusers_timesteps(family: Family, steps: int, *, num_train_timesteps: int = 1000,
                        spacing: Spacing = "leading", steps_offset: int = 0) -> np.ndarray:
    """The decreasing sampling timesteps ``(steps,)`` of ``set_timesteps(steps)`` for a scheduler
    ``family`` (see the module docstring), float64 (integers except ``k``'s ``linspace``)."""
    T, n = num_train_timesteps, steps
    if not 1 <= n <= T:
        raise ConfigError(f"sampler.steps: {n} steps on a schedule of {T} timesteps (1 to {T})")
    if spacing == "trailing":  # one formula in every class
        t = np.arange(T, 0, -T / n).round() - 1
        return t.astype(np.float32 if family == "k" else np.int64).astype(np.float64)
    if family == "dpm":
        if spacing == "linspace":
            t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
        else:
            raise ConfigError(f"unknown timestep spacing {spacing!r}; use leading, linspace or trailing")
        return t.astype(np.float64)
    if spacing == "linspace":
        if family == "k":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64).astype(np.float64)
    if spacing == "leading":
        return ((np.arange(0, n) * (T // n)).round()[::-1] + steps_offset).astype(np.float64)
    raise ConfigError(f"unknown timestep spacing {spacing!r}; use leading, linspace or trailing")


def plms_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """diffusers' ``PNDMScheduler(skip_prk_steps=True)`` sequence for a grid: the second timestep
    repeated (its first model call there is the Heun warm-up), ``n + 1`` entries for ``n > 1``."""
    if len(timesteps) < 2:
        return timesteps.copy()
    return np.concatenate([timesteps[:2], timesteps[1:]])


@attrs.frozen
class GridSpec:
    """How one sampler spaces its sigmas on a discrete schedule."""

    family: Family  # which diffusers formula (module docstring)
    spacing: Spacing  # leading / linspace / trailing
    steps_offset: int  # added to leading timesteps
    final: FinalSigma  # last sigma: 0, or sigma at t = 0 (DDIM/PNDM set_alpha_to_one=False)
    karras: bool  # Karras et al. sigmas over the grid's range
    sigma_range: tuple[float | None, float | None] = (None, None)  # Euler's sigma_min / sigma_max
    clip_x0: float | None = None  # clip_sample: clip the x0 estimate to [-r, r]
    round_karras_t: bool = True  # DPM-Solver rounds Karras timesteps (not for cosine betas)
    scheduler: str | None = None  # the diffusers class (DDIM/PNDM step to t - T // steps)
    lower_order_final: bool = True  # DPM-Solver: first-order last step below 15 steps ...
    euler_at_final: bool = False  # ... or always
    force_final: bool = False  # ``final`` given by [sampler]: it wins over DDIM/PNDM's t - T // n last step


@attrs.frozen
class SamplingPlan:
    """Everything a run needs besides the model: sigmas and how they reach the network."""

    sigmas: Tensor  # (steps + 1,) float64 on the CPU, decreasing
    schedule: NoiseSchedule  # maps sigma to the network's time input for this grid
    start_vp: bool = True  # start from unit noise in VP space (std sqrt(1 + sigma^2)), else std sigma
    final_vp: bool = False  # the decoder gets the last sample in VP space (x / sqrt(1 + sigma^2))
    round_t: bool = False  # round the network's timesteps (DPM-Solver with Karras sigmas)
    clip_x0: float | None = None  # clip the x0 estimate to [-clip_x0, clip_x0]
    options: dict[str, Any] = attrs.field(factory=dict)  # extra sampler keywords (targets, ...)

    def start_std(self, sigma: float) -> float:
        """The std of the first sample at ``sigma`` (diffusers' ``init_noise_sigma``)."""
        return math.sqrt(1 + sigma**2) if self.start_vp else sigma

    def final_scale(self, sigma: float) -> float:
        """The factor from the last sample at ``sigma`` to the latents the decoder gets: VP
        schedulers (DDIM, PNDM, DPM-Solver) hand over ``x_vp``, the Euler family ``x``."""
        return 1 / math.sqrt(1 + sigma**2) if self.final_vp else 1.0


def _refuse(class_name: str, settings: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    def fail(key: str, why: str) -> None:
        raise ConfigError(f"the model's scheduler config (scheduler/scheduler_config.json) gives {class_name} "
                          f"{key}={settings[key]!r} ({why}), which the engine does not reproduce; change the key "
                          "there or choose another sampler")

    for key, what in _UNSUPPORTED.items():
        if key in settings and settings[key] not in (None, False):
            fail(key, what)
    if settings.get("interpolation_type", "linear") != "linear":
        fail("interpolation_type", "log-linear sigmas over the whole range")
    if settings.get("timestep_type", "discrete") != "discrete" and config.get("prediction_type") == "v_prediction":
        fail("timestep_type", "the network is given 0.25 log(sigma) as its time input")
    if settings.get("variance_type") not in (None, "fixed_small"):
        fail("variance_type", "another DDPM posterior variance")
    if settings.get("lambda_min_clipped", -math.inf) != -math.inf:
        fail("lambda_min_clipped", "a clipped last timestep")
    if class_name == "PNDMScheduler" and not settings["skip_prk_steps"]:
        fail("skip_prk_steps", "Runge-Kutta warm-up steps; the engine's plms is skip_prk_steps=True")
    if settings["timestep_spacing"] not in ("leading", "linspace", "trailing"):
        fail("timestep_spacing", "an unknown spacing")


def _engine_config(schedule: DiscreteSchedule) -> dict[str, Any]:
    """What a schedule without a diffusers config stands for: its own spacing, a last step to
    sigma 0, PLMS without Runge-Kutta steps, no clipping."""
    return {"timestep_spacing": schedule.spacing, "steps_offset": schedule.steps_offset, "set_alpha_to_one": True,
            "skip_prk_steps": True, "clip_sample": False}


def grid_spec(sampler: str, schedule: DiscreteSchedule, *, spacing: Spacing | None = None,
              steps_offset: int | None = None, final_sigma: FinalSigma | None = None,
              karras: bool | None = None) -> GridSpec | None:
    """The grid ``sampler`` uses on ``schedule``: from the schedule's diffusers config resolved for
    the sampler's scheduler class, then the given overrides (the ``[sampler]`` keys; None keeps the
    config's). None for a sampler without a diffusers counterpart (``edm``, plugins' samplers)."""
    class_name = SAMPLER_SCHEDULERS.get(sampler)
    if class_name is None:
        return None
    config = schedule.scheduler_config if schedule.scheduler_config is not None else _engine_config(schedule)
    s = resolve_config(class_name, config)
    _refuse(class_name, s, config)
    family = _FAMILY.get(class_name, "k")
    if class_name in ("DDIMScheduler", "PNDMScheduler"):
        final: FinalSigma = "zero" if s["set_alpha_to_one"] else "sigma_min"
    else:
        final = s.get("final_sigmas_type", "zero")
    final = final_sigma or final
    clip = float(s["clip_sample_range"]) if s.get("clip_sample") else None
    return GridSpec(family=family, spacing=spacing or s["timestep_spacing"],
                    steps_offset=s["steps_offset"] if steps_offset is None else steps_offset, final=final,
                    karras=bool(s.get("use_karras_sigmas", False)) if karras is None else karras,
                    sigma_range=(s.get("sigma_min"), s.get("sigma_max")), clip_x0=clip,
                    round_karras_t=config.get("beta_schedule") != "squaredcos_cap_v2", scheduler=class_name,
                    lower_order_final=bool(s.get("lower_order_final", True)),
                    euler_at_final=bool(s.get("euler_at_final", False)), force_final=final_sigma is not None)


def grid_plan(schedule: DiscreteSchedule, spec: GridSpec, steps: int, *, rho: float = 7.0) -> SamplingPlan:
    """The :class:`SamplingPlan` of ``steps`` steps on ``schedule`` for ``spec``, as diffusers'
    ``set_timesteps`` computes its sigmas, its ``init_noise_sigma`` and its last step."""
    ts = diffusers_timesteps(spec.family, steps, num_train_timesteps=schedule.num_train_timesteps,
                             spacing=spec.spacing, steps_offset=spec.steps_offset)
    # integer grids are exact either way; fractional ones are np.interp'd (linear) in diffusers
    view = schedule.with_interpolation("linear")
    sig = view.t_to_sigma(torch.from_numpy(ts.copy()))
    round_t = False
    if spec.karras:
        if spec.family == "dpm":  # DPM-Solver spans the whole training range
            lo, hi = schedule.sigma_min, schedule.sigma_max
            round_t = spec.round_karras_t
        else:
            lo = spec.sigma_range[0] if spec.sigma_range[0] is not None else float(sig[-1])
            hi = spec.sigma_range[1] if spec.sigma_range[1] is not None else float(sig[0])
        sig = karras_sigmas(steps, lo, hi, rho=rho)
        view = schedule.with_interpolation("log_linear")  # diffusers' _sigma_to_t
    last = sig.new_zeros(1) if spec.final == "zero" else schedule.sigmas[:1].clone()
    options: dict[str, Any] = {}
    if spec.scheduler in ("DDIMScheduler", "PNDMScheduler") and not spec.karras:
        ratio_last, targets = _ratio_steps(view, ts, last)
        last = last if spec.force_final else ratio_last
        if targets is not None:
            options["targets"] = targets
            if spec.scheduler == "PNDMScheduler":  # its warm-up step starts from t_1 + T // n
                start = torch.tensor([ts[1] + schedule.num_train_timesteps // steps], dtype=torch.float64)
                options["warmup_from"] = float(view.t_to_sigma(start)[0])
    if spec.family == "dpm" and spec.final != "zero":  # to 0 the last step is first order anyway
        options["first_order_final"] = spec.euler_at_final or (spec.lower_order_final and steps < 15)
    sigmas = torch.cat([sig, last])
    # the Euler family starts at sigma_max itself for linspace/trailing (its init_noise_sigma)
    start_vp = not (spec.family == "k" and spec.spacing in ("linspace", "trailing"))
    return SamplingPlan(sigmas, view, start_vp=start_vp, final_vp=spec.family != "k", round_t=round_t,
                        clip_x0=spec.clip_x0, options=options)


def _ratio_steps(schedule: DiscreteSchedule, ts: np.ndarray, final: Tensor) -> tuple[Tensor, Tensor | None]:
    """DDIM and PNDM step from ``t`` to ``t - T // steps`` (``final`` below 0), not to the next
    grid timestep: the last sigma, and the landing sigmas of the other steps where they are not
    the next grid sigma (None when the grid is such a chain, as ``leading`` always is)."""
    prev = ts - schedule.num_train_timesteps // len(ts)
    land = schedule.t_to_sigma(torch.from_numpy(prev.clip(min=0)))
    land = torch.where(torch.from_numpy(prev >= 0), land, final.expand_as(land))
    if np.array_equal(prev[:-1], ts[1:]):
        return land[-1:], None
    return land[-1:], land[:-1]


def is_variance_preserving(schedule: NoiseSchedule) -> bool:
    """Whether a run on ``schedule`` starts from unit-variance noise in VP space.

    Discrete DDPM betas and VP cosine do (diffusers' ``init_noise_sigma``); EDM (variance
    exploding) starts from noise of std ``sigma``. A schedule may say which with a boolean
    ``variance_preserving`` attribute.
    """
    from t2i_engine.diffusion.schedules import EDMSchedule

    return bool(getattr(schedule, "variance_preserving", not isinstance(schedule, EDMSchedule)))


def default_plan(schedule: NoiseSchedule, steps: int | None = None, *, karras: bool = False, rho: float = 7.0,
                 sigmas: Tensor | None = None) -> SamplingPlan:
    """The plan of a sampler without a diffusers grid: ``sigmas``, else the schedule's own."""
    if sigmas is None:
        if steps is None:
            raise TypeError("default_plan needs steps or sigmas")
        sigmas = sampling_sigmas(schedule, steps, karras=karras, rho=rho)
    return SamplingPlan(sigmas.to(device="cpu", dtype=torch.float64), schedule,
                        start_vp=is_variance_preserving(schedule))


__all__ = [
    "SAMPLER_SCHEDULERS", "SCHEDULER_DEFAULTS", "GridSpec", "SamplingPlan", "betas_config", "default_plan",
    "diffusers_timesteps", "grid_plan", "grid_spec", "is_variance_preserving", "plms_timesteps", "resolve_config",
]
