"""The built-in samplers and schedules as ``name -> factory`` mappings (``SAMPLERS``, ``SCHEDULES``).

Each factory carries a frozen attrs ``Config`` (the keys of the ``[sampler]`` / ``[schedule]``
table) and ``factory(config)`` returns a bound object. A sampling task does::

    sampler = SAMPLERS["euler"](EulerConfig(steps=30))
    plan = sampler.plan(schedule)                   # sigmas (steps + 1,), start std, ...
    x = sampler(model, noise * plan.start_std(float(plan.sigmas[0])), plan.sigmas, generator=g, callback=cb)

(:func:`t2i_engine.pipeline.generate` does this, with the plan's timing and last-step scale.)

The core's hookimpl returns these dicts from ``register_samplers`` / ``register_schedules``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from t2i_engine.diffusion import samplers as S
from t2i_engine.diffusion.guidance import float_field
from t2i_engine.diffusion.grids import GridSpec, SamplingPlan, default_plan, grid_plan, grid_spec
from t2i_engine.diffusion.schedules import DiscreteSchedule, EDMSchedule, VPCosineSchedule
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import Denoiser, NoiseSchedule, StepCallback

v = attrs.validators


def _strict_int(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"'{attr.name}' must be an integer, got {value!r}")


def int_field(default: int, *validators: Any) -> Any:
    """An int config field (bools rejected) with extra validators."""
    return attrs.field(default=default, validator=[_strict_int, *validators])


def bool_field(default: bool) -> Any:
    """A bool config field."""
    return attrs.field(default=default, validator=v.instance_of(bool))


# ---------------------------------------------------------------------------------------------
# Sampler configs
# ---------------------------------------------------------------------------------------------

def optional_field(*validators: Any) -> Any:
    """A config field that may be left unset (None: take the value from the model's schedule)."""
    return attrs.field(default=None, validator=v.optional(list(validators)))


@attrs.frozen
class SamplerConfig:
    """Keys every sampler takes. Unset grid keys (None) come from the model's scheduler config,
    resolved for the sampler's diffusers scheduler class (:mod:`t2i_engine.diffusion.grids`)."""

    steps: int = int_field(30, v.ge(1))  # number of sampler steps (model calls for 1st-order ones)
    karras: bool | None = optional_field(v.instance_of(bool))  # Karras et al. sigmas (use_karras_sigmas)
    rho: float = float_field(7.0, v.gt(0.0))  # Karras spacing exponent
    spacing: Literal["leading", "trailing", "linspace"] | None = optional_field(
        v.in_(("leading", "trailing", "linspace")))  # timestep spacing (timestep_spacing)
    steps_offset: int | None = optional_field(_strict_int, v.ge(0))  # added to 'leading' timesteps
    final_sigma: Literal["zero", "sigma_min"] | None = optional_field(
        v.in_(("zero", "sigma_min")))  # last sigma: 0, or sigma(t=0) (set_alpha_to_one=false)


@attrs.frozen
class ChurnConfig(SamplerConfig):
    """Euler / Heun with EDM's optional stochastic churn (0 = deterministic)."""

    s_churn: float = float_field(0.0, v.ge(0.0))  # total churn S_churn (gamma = S_churn / steps)
    s_tmin: float = float_field(0.0, v.ge(0.0))  # churn only for sigma >= s_tmin
    s_tmax: float = float_field(math.inf, v.ge(0.0))  # ... and sigma <= s_tmax
    s_noise: float = float_field(1.0, v.gt(0.0))  # scale of the added noise


@attrs.frozen
class EDMConfig(ChurnConfig):
    """EDM stochastic sampler (Heun + churn); defaults of Karras et al. 2022 (ImageNet-64)."""

    s_churn: float = float_field(40.0, v.ge(0.0))
    s_tmin: float = float_field(0.05, v.ge(0.0))
    s_tmax: float = float_field(50.0, v.ge(0.0))
    s_noise: float = float_field(1.003, v.gt(0.0))


@attrs.frozen
class DDIMConfig(SamplerConfig):
    """DDIM; ``eta`` 0 is deterministic, 1 is DDPM's posterior noise."""

    eta: float = float_field(0.0, v.ge(0.0), v.le(1.0))


@attrs.frozen
class AncestralConfig(SamplerConfig):
    """Euler ancestral and DPM-Solver++ 2M SDE: noise amount ``eta`` and its scale."""

    eta: float = float_field(1.0, v.ge(0.0))
    s_noise: float = float_field(1.0, v.gt(0.0))


@attrs.frozen
class LMSConfig(SamplerConfig):
    """Linear multistep of up to ``order`` (1 to 4)."""

    order: int = int_field(4, v.ge(1), v.le(4))


SamplerFn = Callable[..., Tensor]
_COMMON = ("steps", "karras", "rho", "spacing", "steps_offset", "final_sigma")


@attrs.frozen
class ConfiguredSampler:
    """A sampler function bound to its config: call :meth:`sigmas`, then call the object."""

    name: str
    fn: SamplerFn
    config: SamplerConfig

    @property
    def steps(self) -> int:
        """The configured step count."""
        return self.config.steps

    def options(self) -> dict[str, Any]:
        """The keyword options passed to the sampler function."""
        return {k: val for k, val in attrs.asdict(self.config).items() if k not in _COMMON}

    def plan(self, schedule: NoiseSchedule) -> SamplingPlan:
        """Sigmas, network timing, start and end of a run on ``schedule``: on a discrete schedule
        the grid of the sampler's diffusers scheduler class (:func:`grids.grid_spec`), else the
        schedule's own sigmas."""
        c = self.config
        grid_keys = {"spacing": c.spacing, "steps_offset": c.steps_offset, "final_sigma": c.final_sigma}
        if isinstance(schedule, DiscreteSchedule):
            spec = grid_spec(self.name, schedule, karras=c.karras, **grid_keys)
            if spec is None:  # no diffusers class: the schedule's own spacing, with the overrides
                spec = GridSpec(family="k", spacing=c.spacing or schedule.spacing, final=c.final_sigma or "zero",
                                steps_offset=schedule.steps_offset if c.steps_offset is None else c.steps_offset,
                                karras=bool(c.karras))
            return grid_plan(schedule, spec, c.steps, rho=c.rho)
        given = [k for k, val in grid_keys.items() if val is not None]
        if given:
            raise ConfigError(f"sampler '{self.name}': {', '.join(given)} apply to discrete (DDPM) schedules only")
        return default_plan(schedule, c.steps, karras=bool(c.karras), rho=c.rho)

    def sigmas(self, schedule: NoiseSchedule, *, device: torch.device | None = None) -> Tensor:
        """The ``steps + 1`` decreasing sigmas to sample over (see :meth:`plan`)."""
        return self.plan(schedule).sigmas.to(device)

    def __call__(self, model: Denoiser, x: Tensor, sigmas: Tensor, *,
                 generator: torch.Generator | None = None,
                 callback: StepCallback | None = None, **plan_options: Any) -> Tensor:
        """Run the sampler from ``x`` (noise at ``sigmas[0]``) down ``sigmas``; ``plan_options``
        are a :class:`SamplingPlan`'s extra keywords (``plan.options``)."""
        return self.fn(model, x, sigmas, generator=generator, callback=callback, **self.options(), **plan_options)


def _sampler(name: str, fn: SamplerFn, config_cls: type[SamplerConfig]) -> Callable[..., ConfiguredSampler]:
    def factory(config: SamplerConfig | None = None) -> ConfiguredSampler:
        return ConfiguredSampler(name, fn, config if config is not None else config_cls())

    factory.Config = config_cls  # type: ignore[attr-defined]
    factory.__doc__ = f"Sampler {name!r}: {(fn.__doc__ or '').strip().splitlines()[0]}"
    return factory


SAMPLERS: dict[str, Callable[..., Any]] = {
    "ddpm": _sampler("ddpm", S.sample_ddpm, SamplerConfig),
    "ddim": _sampler("ddim", S.sample_ddim, DDIMConfig),
    "plms": _sampler("plms", S.sample_plms, SamplerConfig),
    "pndm": _sampler("pndm", S.sample_plms, SamplerConfig),
    "euler": _sampler("euler", S.sample_euler, ChurnConfig),
    "euler_ancestral": _sampler("euler_ancestral", S.sample_euler_ancestral, AncestralConfig),
    "heun": _sampler("heun", S.sample_heun, ChurnConfig),
    "dpmpp_2m": _sampler("dpmpp_2m", S.sample_dpmpp_2m, SamplerConfig),
    "dpmpp_2m_sde": _sampler("dpmpp_2m_sde", S.sample_dpmpp_2m_sde, AncestralConfig),
    "lms": _sampler("lms", S.sample_lms, LMSConfig),
    "edm": _sampler("edm", S.sample_heun, EDMConfig),
}
"""Built-in samplers, ``name -> factory`` (``factory.Config`` holds the keys)."""


# ---------------------------------------------------------------------------------------------
# Schedule configs
# ---------------------------------------------------------------------------------------------

@attrs.frozen
class DiscreteConfig:
    """Keys of every discrete (DDPM) schedule."""

    num_train_timesteps: int = int_field(1000, v.ge(2))  # T
    spacing: Literal["leading", "trailing", "linspace"] = attrs.field(
        default="leading", validator=v.in_(("leading", "trailing", "linspace")))  # timestep spacing
    steps_offset: int = int_field(0, v.ge(0))  # added to 'leading' timesteps (SD uses 1)
    rescale_zero_snr: bool = bool_field(False)  # Lin et al. 2023 zero terminal SNR


@attrs.frozen
class LinearConfig(DiscreteConfig):
    """Linear betas (Ho et al. 2020)."""

    beta_start: float = float_field(0.0001, v.gt(0.0), v.lt(1.0))
    beta_end: float = float_field(0.02, v.gt(0.0), v.lt(1.0))


@attrs.frozen
class ScaledLinearConfig(DiscreteConfig):
    """Betas linear in sqrt(beta); the defaults are Stable Diffusion's."""

    steps_offset: int = int_field(1, v.ge(0))
    beta_start: float = float_field(0.00085, v.gt(0.0), v.lt(1.0))
    beta_end: float = float_field(0.012, v.gt(0.0), v.lt(1.0))


@attrs.frozen
class EDMScheduleConfig:
    """Continuous EDM schedule (Karras et al. 2022)."""

    sigma_min: float = float_field(0.002, v.gt(0.0))
    sigma_max: float = float_field(80.0, v.gt(0.0))
    rho: float = float_field(7.0, v.gt(0.0))
    sigma_data: float = float_field(0.5, v.gt(0.0))  # data std used by the preconditioning
    p_mean: float = float_field(-1.2)  # training log-sigma mean
    p_std: float = float_field(1.2, v.gt(0.0))  # training log-sigma std


@attrs.frozen
class VPCosineConfig:
    """Continuous cosine log-SNR schedule (Imagen)."""

    s: float = float_field(0.008, v.ge(0.0))  # cosine offset
    logsnr_min: float = float_field(-15.0)
    logsnr_max: float = float_field(15.0)


def _discrete(kind: str, config_cls: type[DiscreteConfig]) -> Callable[..., DiscreteSchedule]:
    def factory(config: DiscreteConfig | None = None) -> DiscreteSchedule:
        c = config if config is not None else config_cls()
        betas = {k: getattr(c, k) for k in ("beta_start", "beta_end") if hasattr(c, k)}
        return DiscreteSchedule.from_betas(
            kind, num_train_timesteps=c.num_train_timesteps, rescale_zero_snr=c.rescale_zero_snr,  # type: ignore[arg-type]
            spacing=c.spacing, steps_offset=c.steps_offset, **betas)

    factory.Config = config_cls  # type: ignore[attr-defined]
    factory.__doc__ = f"Discrete {kind} beta schedule."
    return factory


def _edm(config: EDMScheduleConfig | None = None) -> EDMSchedule:
    """Continuous EDM schedule."""
    return EDMSchedule(**attrs.asdict(config if config is not None else EDMScheduleConfig()))


def _vp_cosine(config: VPCosineConfig | None = None) -> VPCosineSchedule:
    """Continuous VP cosine schedule."""
    return VPCosineSchedule(**attrs.asdict(config if config is not None else VPCosineConfig()))


_edm.Config = EDMScheduleConfig  # type: ignore[attr-defined]
_vp_cosine.Config = VPCosineConfig  # type: ignore[attr-defined]

SCHEDULES: dict[str, Callable[..., Any]] = {
    "linear": _discrete("linear", LinearConfig),
    "scaled_linear": _discrete("scaled_linear", ScaledLinearConfig),
    "cosine": _discrete("cosine", DiscreteConfig),
    "squaredcos_cap_v2": _discrete("squaredcos_cap_v2", DiscreteConfig),
    "edm": _edm,
    "vp_cosine": _vp_cosine,
}
"""Built-in noise schedules, ``type -> factory``."""


def build(registry: Mapping[str, Callable[..., Any]], name: str, *, kind: str = "sampler",
          **options: Any) -> Any:
    """Build ``registry[name]`` from keyword options, turning every failure into a ConfigError.

    For Python users and tests; config files go through the engine's loader instead.
    """
    if name not in registry:
        near = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(sorted(registry))}"
        raise ConfigError(f"unknown {kind} {name!r}{hint}")
    factory = registry[name]
    config_cls = getattr(factory, "Config", None)
    if config_cls is None:
        return factory()
    try:
        config = config_cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{kind} {name!r}: {e}") from e
    return factory(config)


__all__ = [
    "SAMPLERS", "SCHEDULES", "AncestralConfig", "ChurnConfig", "ConfiguredSampler", "DDIMConfig",
    "DiscreteConfig", "EDMConfig", "EDMScheduleConfig", "LMSConfig", "LinearConfig",
    "SamplerConfig", "ScaledLinearConfig", "VPCosineConfig", "bool_field", "build", "int_field",
]
