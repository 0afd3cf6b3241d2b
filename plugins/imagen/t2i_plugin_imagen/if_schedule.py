"""DeepFloyd IF's DDPM scheduler config (``scheduler/scheduler_config.json``) read into the
core's :class:`~t2i_engine.diffusion.schedules.DiscreteSchedule` plus the sampling options it
carries (variance type, dynamic thresholding). Every key is read or refused by name."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from t2i_engine.diffusion.schedules import DiscreteSchedule
from t2i_engine.errors import CheckpointError

VarianceType = Literal["learned_range", "fixed_small"]


@attrs.frozen
class IFSchedulerConfig:
    """What IF's ``DDPMScheduler`` config says (diffusers' defaults where a key is absent)."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    variance_type: VarianceType = "learned_range"  # learned_range: the UNet's second half interpolates the log-variance
    thresholding: bool = True  # dynamic thresholding of x0 (wins over clip_sample, as in diffusers)
    dynamic_thresholding_ratio: float = 0.95  # the percentile p
    sample_max_value: float = 1.5  # the ceiling of the threshold s (s in [1, max])
    clip_sample: bool = True  # static clip of x0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    steps_offset: int = 0  # added to the 'leading' timesteps

    def schedule(self) -> DiscreteSchedule:
        """The discrete schedule (``leading`` spacing, the DDPM sampler's grid)."""
        return DiscreteSchedule.from_betas(self.beta_schedule, num_train_timesteps=self.num_train_timesteps,
                                           beta_start=self.beta_start, beta_end=self.beta_end, spacing="leading",
                                           steps_offset=self.steps_offset)


_FIXED: dict[str, tuple[Any, ...]] = {
    "prediction_type": ("epsilon",), "trained_betas": (None,), "timestep_spacing": ("leading",),
    "rescale_betas_zero_snr": (False,), "_class_name": ("DDPMScheduler",),
}
_DEFAULTS = {"variance_type": "fixed_small", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
             "sample_max_value": 1.0, "beta_schedule": "linear"}  # diffusers' DDPMScheduler defaults


def if_scheduler_config(config: dict[str, Any], *, source: str = "scheduler_config.json") -> IFSchedulerConfig:
    """Read a diffusers ``DDPMScheduler`` config; keys IF's sampling does not implement (another
    prediction type, timestep spacing, trained betas, variance type) are refused by name."""
    cfg = {k: v for k, v in config.items() if k not in ("_diffusers_version",)}
    for key, allowed in _FIXED.items():
        value = cfg.pop(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"{source}: {key} = {value!r} is not supported for IF sampling "
                                  f"(supported: {', '.join(map(repr, allowed))})")
    fields = {f.name for f in attrs.fields(IFSchedulerConfig)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise CheckpointError(f"{source}: scheduler config keys {', '.join(unknown)} are not understood")
    values = {**_DEFAULTS, **cfg}
    if values["variance_type"] not in ("learned_range", "fixed_small"):
        raise CheckpointError(f"{source}: variance_type = {values['variance_type']!r} is not supported "
                              "(supported: 'learned_range', 'fixed_small')")
    if values["beta_schedule"] not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise CheckpointError(f"{source}: beta_schedule = {values['beta_schedule']!r} is not supported")
    return IFSchedulerConfig(**values)
