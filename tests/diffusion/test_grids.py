"""Timestep grids and sampling plans against diffusers' own schedulers (``set_timesteps``,
``sigmas``, ``init_noise_sigma``, ``from_config``), class by class."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch

from t2i_engine.diffusion import grids
from t2i_engine.diffusion.registry import SAMPLERS
from t2i_engine.diffusion.schedules import DiscreteSchedule
from t2i_engine.errors import ConfigError

diffusers = pytest.importorskip("diffusers")

FAMILY = {"DDIMScheduler": "ddim", "PNDMScheduler": "ddim", "DDPMScheduler": "ddim",
          "EulerDiscreteScheduler": "k", "EulerAncestralDiscreteScheduler": "k", "HeunDiscreteScheduler": "k",
          "LMSDiscreteScheduler": "k", "DPMSolverMultistepScheduler": "dpm"}
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _unique_timesteps(ref) -> np.ndarray:
    """The decreasing grid of a diffusers scheduler after set_timesteps (PNDM repeats one; Heun
    repeats all but the first)."""
    ts = ref.timesteps.double().numpy()
    return np.array([t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]])


COMBOS = list(itertools.product([1, 2, 3, 6, 7, 10, 25, 50, 999], ["leading", "linspace", "trailing"], [0, 1, 3],
                                 [1000, 500]))


@pytest.mark.parametrize("cls", list(FAMILY))
def test_timesteps_match_set_timesteps(cls):
    """Every (steps, spacing, steps_offset, T) combination, per class."""
    for steps, spacing, offset, T in COMBOS:
        if steps > T:
            continue
        ref = getattr(diffusers, cls)(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset,
                                      **({"skip_prk_steps": True} if cls == "PNDMScheduler" else {}), **SD)
        ref.set_timesteps(steps)
        ours = grids.diffusers_timesteps(FAMILY[cls], steps, num_train_timesteps=T, spacing=spacing,
                                         steps_offset=offset)
        want = _unique_timesteps(ref)
        if cls == "PNDMScheduler" and steps > 1:
            want = np.concatenate([want[:1], want[1:]])
        np.testing.assert_array_equal(ours, want, err_msg=f"{cls} {steps} {spacing} +{offset} T={T}")


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_plms_sequence_repeats_the_second_timestep(steps):
    ref = diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1, **SD)
    ref.set_timesteps(steps)
    ours = grids.plms_timesteps(grids.diffusers_timesteps("ddim", steps, steps_offset=1))
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_dpm_has_three_grids():
    """SD 1.5's config (no timestep_spacing): DDIM 'leading' [901..1], DPM-Solver 'linspace'
    [999, 899, ..., 100] and its 'leading' a third grid, step ratio T // (n + 1)."""
    assert grids.diffusers_timesteps("ddim", 10, steps_offset=1).tolist() == list(range(901, 0, -100))
    assert grids.diffusers_timesteps("dpm", 10, spacing="linspace").tolist() == [999, 899, 799, 699, 599, 500, 400,
                                                                                 300, 200, 100]
    assert grids.diffusers_timesteps("dpm", 10, spacing="leading", steps_offset=1).tolist()[:2] == [901, 811]


@pytest.mark.parametrize("cls", list(grids.SCHEDULER_DEFAULTS))
def test_defaults_are_diffusers_init_defaults(cls):
    params = inspect.signature(getattr(diffusers, cls).__init__).parameters
    for key, value in grids.SCHEDULER_DEFAULTS[cls].items():
        assert key in params, f"{cls} has no {key}"
        assert params[key].default == value, f"{cls}.{key}"


SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
SAMPLER_CLASS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
                 "euler_ancestral": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
                 "lms": "LMSDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def _ref_from_config(cls: str, config: dict, steps: int):
    """``<cls>.from_config(<the folder's scheduler>.config)``, as a diffusers user swaps schedulers."""
    source = getattr(diffusers, config["_class_name"]).from_config(config)
    ref = getattr(diffusers, cls).from_config(source.config)
    ref.set_timesteps(steps)
    return ref


def _plan(sampler: str, config: dict, steps: int, **keys):
    schedule = DiscreteSchedule.from_betas(config["beta_schedule"], beta_start=config["beta_start"],
                                           beta_end=config["beta_end"],
                                           rescale_zero_snr=config.get("rescale_betas_zero_snr", False),
                                           scheduler_config=config)
    return SAMPLERS[sampler](SAMPLERS[sampler].Config(steps=steps, **keys)).plan(schedule)


EXTRA = [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace", "steps_offset": 0},
         {"use_karras_sigmas": True}, {"set_alpha_to_one": True}, {"final_sigmas_type": "sigma_min"},
         {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}]


@pytest.mark.parametrize("extra", EXTRA, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()) or "sd15")
@pytest.mark.parametrize("sampler", list(SAMPLER_CLASS))
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_plan_matches_from_config(sampler, extra, steps):
    """The plan's timesteps (what the network sees), sigmas, start and last sigma are those of
    the sampler's scheduler class built from the folder's config."""
    config = {**SD15, **extra}
    cls = SAMPLER_CLASS[sampler]
    if extra.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in grids.SCHEDULER_DEFAULTS[cls]:
        pytest.skip(f"{cls} has no rescale_betas_zero_snr (diffusers drops it); the engine keeps the model's betas")
    ref = _ref_from_config(cls, config, steps)
    plan = _plan(sampler, config, steps)
    t = plan.schedule.sigma_to_t(plan.sigmas[:-1])
    if plan.round_t:
        t = t.round()
    want_t = torch.from_numpy(_unique_timesteps(ref))
    torch.testing.assert_close(t, want_t, atol=2e-3, rtol=0)
    if hasattr(ref, "sigmas") and cls != "DDPMScheduler":
        want = ref.sigmas.double()
        if cls == "HeunDiscreteScheduler":
            want = torch.cat([want[:1], want[1:-1:2], want[-1:]])
        torch.testing.assert_close(plan.sigmas, want, rtol=2e-5, atol=1e-6)
        vp = 1.0 if not plan.final_vp else float(1 / (1 + plan.sigmas[-1] ** 2) ** 0.5)
        assert plan.final_scale(float(plan.sigmas[-1])) == pytest.approx(vp)
        start = plan.start_std(float(plan.sigmas[0]))
        assert start == pytest.approx(float(ref.init_noise_sigma) * (1 if cls in (
            "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
            "LMSDiscreteScheduler") else float((1 + plan.sigmas[0] ** 2) ** 0.5)), rel=1e-5)
    if cls in ("DDIMScheduler", "PNDMScheduler"):
        last = ref.final_alpha_cumprod.double()
        prev = float(want_t[-1]) - 1000 // steps
        ab = ref.alphas_cumprod[int(prev)].double() if prev >= 0 else last
        torch.testing.assert_close(plan.sigmas[-1], ((1 - ab) / ab).sqrt(), rtol=1e-5, atol=1e-7)


def test_sampler_keys_override():
    plan = _plan("ddim", SD15, 10, spacing="trailing", steps_offset=0, final_sigma="zero")
    assert plan.schedule.sigma_to_t(plan.sigmas[:-1]).round().tolist() == list(range(999, 0, -100))
    assert float(plan.sigmas[-1]) == 0
    plan = _plan("dpmpp_2m", SD15, 10, spacing="leading", steps_offset=1)
    assert plan.schedule.sigma_to_t(plan.sigmas[:-1]).round().tolist()[:2] == [901, 811]


@pytest.mark.parametrize("sampler,key,value", [
    ("euler", "interpolation_type", "log_linear"), ("euler", "use_exponential_sigmas", True),
    ("lms", "use_beta_sigmas", True), ("dpmpp_2m", "use_lu_lambdas", True), ("dpmpp_2m", "lambda_min_clipped", -5.1),
    ("ddim", "thresholding", True), ("pndm", "skip_prk_steps", False), ("ddim", "timestep_spacing", "middle"),
    ("ddpm", "variance_type", "fixed_large"), ("dpmpp_2m", "variance_type", "learned_range")])
def test_unsupported_keys_are_refused(sampler, key, value):
    with pytest.raises(ConfigError, match=key):
        _plan(sampler, {**SD15, key: value}, 10)


def test_continuous_timesteps_refused_for_v_only():
    _plan("euler", {**SD15, "timestep_type": "continuous"}, 10)  # eps: diffusers ignores it
    with pytest.raises(ConfigError, match="timestep_type"):
        _plan("euler", {**SD15, "timestep_type": "continuous", "prediction_type": "v_prediction"}, 10)


def test_clip_sample_is_honoured():
    """DDIM's class default clip_sample=True applies when the file lacks the key."""
    assert _plan("ddim", {k: v for k, v in SD15.items() if k != "clip_sample"}, 10).clip_x0 == 1.0
    assert _plan("ddim", SD15, 10).clip_x0 is None


def test_betas_config_takes_the_source_class_defaults():
    assert grids.betas_config({"_class_name": "HeunDiscreteScheduler"})["beta_end"] == 0.012
    assert grids.betas_config({"_class_name": "PNDMScheduler"})["beta_schedule"] == "linear"
    with pytest.raises(ConfigError, match="trained_betas"):
        grids.betas_config({"trained_betas": [0.1, 0.2]})


def _net_fn(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.float64).reshape(-1, *([1] * (x_vp.ndim - 1))) if t.ndim else t.to(torch.float64)
    return 0.6 * x_vp + 0.2 * torch.tanh(x_vp) + 0.1 * torch.cos(t / 300.0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler,spacing,steps", [("ddim", "trailing", 7), ("ddim", "linspace", 6),
                                                   ("pndm", "trailing", 7), ("pndm", "linspace", 6),
                                                   ("pndm", "leading", 5), ("dpmpp_2m", "leading", 7)])
def test_trajectory_matches_scheduler_loop(sampler, spacing, steps, prediction):
    """The whole run (plan + sampler + the pipeline's start and end scaling) against diffusers'
    scheduler loop on an analytic network, including grids whose steps do not chain (DDIM and
    PNDM step to t - T // n) and PLMS combining raw v outputs."""
    from t2i_engine.diffusion.parameterization import DenoiserWrapper
    from t2i_engine.interfaces import Conditioning, DenoiserNet

    config = {**SD15, "timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0,
              "prediction_type": "epsilon" if prediction == "eps" else "v_prediction"}
    ref = _ref_from_config(SAMPLER_CLASS[sampler], config, steps)
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lat = z * ref.init_noise_sigma
    for t in ref.timesteps:
        lat = ref.step(_net_fn(ref.scale_model_input(lat, t), t), t, lat).prev_sample

    class Net(DenoiserNet):
        def forward(self, x_t, t, cond):
            return _net_fn(x_t, t)

    Net.prediction = prediction
    configured = SAMPLERS[sampler](SAMPLERS[sampler].Config(steps=steps))
    plan = _plan(sampler, config, steps)
    model = DenoiserWrapper(Net(), plan.schedule, round_t=plan.round_t).bind(Conditioning())
    x = configured(model, z * plan.start_std(float(plan.sigmas[0])), plan.sigmas, **plan.options)
    torch.testing.assert_close(x * plan.final_scale(float(plan.sigmas[-1])), lat, rtol=1e-5, atol=1e-5)


def test_final_sigma_key_wins_on_non_chain_grids():
    """trailing at 6 steps: DDIM's last step lands on t = 0 whatever set_alpha_to_one says; an
    explicit [sampler] final_sigma still decides."""
    config = {**SD15, "timestep_spacing": "trailing", "steps_offset": 0}
    plan = _plan("ddim", config, 6)
    assert float(plan.sigmas[-1]) == pytest.approx(float(plan.schedule.sigmas[0]))
    assert float(_plan("ddim", config, 6, final_sigma="zero").sigmas[-1]) == 0
