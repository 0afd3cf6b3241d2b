"""Trajectory parity with diffusers' schedulers on Stable Diffusion's schedule, in float64.

Both sides are driven by the same eps-model (a fixed nonlinear function of the VP input and the
timestep), the same initial noise and generators seeded alike; diffusers' VP schedulers (DDIM,
DDPM, PNDM) are compared after mapping ``x_vp = x / sqrt(1 + sigma^2)``.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from t2i_engine.diffusion import samplers as S  # noqa: E402
from t2i_engine.diffusion.parameterization import DenoiserWrapper  # noqa: E402
from t2i_engine.diffusion.schedules import (  # noqa: E402
    DiscreteSchedule, append_zero, karras_sigmas, sampling_sigmas, vp_scale,
)
from t2i_engine.interfaces import Conditioning, DenoiserNet  # noqa: E402

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
          beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
STEPS = 8


def eps_fn(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.float64).reshape(-1, *([1] * (x_vp.ndim - 1))) if t.ndim else t.to(torch.float64)
    return 0.7 * x_vp + 0.2 * torch.tanh(x_vp) + 0.1 * torch.cos(t / 300.0)


class EpsNet(DenoiserNet):
    prediction = "eps"

    def forward(self, x_t, t, cond):
        return eps_fn(x_t, t)


def run_ours(fn, ref, *, karras=False, round_t=False, sigmas=None, seed=0, **opts):
    schedule = DiscreteSchedule(ref.alphas_cumprod, spacing=ref.config.timestep_spacing,
                                steps_offset=ref.config.steps_offset)
    if sigmas is None:
        sigmas = sampling_sigmas(schedule, STEPS, karras=karras)
    model = DenoiserWrapper(EpsNet(), schedule, round_t=round_t).bind(Conditioning())
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    x = z / vp_scale(sigmas[0])
    return fn(model, x, sigmas, generator=torch.Generator().manual_seed(seed), **opts), sigmas


def run_ref(ref, *, vp: bool, seed=0, timesteps=None, explicit_noise=False, trajectory=False,
            **step_kwargs):
    """Drive a diffusers scheduler; ``explicit_noise`` feeds float64 generator noise as
    ``variance_noise`` (DPM-Solver would otherwise draw it in float32)."""
    if timesteps is None:
        ref.set_timesteps(STEPS)
    else:
        ref.set_timesteps(timesteps=timesteps)
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    lat = z if vp else z / vp_scale(ref.sigmas[0].double())  # the same start as ours
    import inspect
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g} if "generator" in inspect.signature(ref.step).parameters else {}
    kw.update(step_kwargs)
    traj = []
    for t in ref.timesteps:
        if explicit_noise:
            kw["variance_noise"] = torch.randn(lat.shape, generator=g, dtype=torch.float64)
        inp = ref.scale_model_input(lat, t)
        lat = ref.step(eps_fn(inp, t), t, lat, **kw).prev_sample
        traj.append(lat)
    return (lat, traj) if trajectory else lat


def close(a, b):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("name,cls,fn", [
    ("euler", "EulerDiscreteScheduler", S.sample_euler),
    ("heun", "HeunDiscreteScheduler", S.sample_heun),
    ("lms", "LMSDiscreteScheduler", S.sample_lms),
])
def test_sigma_schedulers(name, cls, fn, karras):
    ref = getattr(diffusers, cls)(**SD, use_karras_sigmas=karras)
    ours, _ = run_ours(fn, ref, karras=karras)
    close(ours, run_ref(ref, vp=False))


@pytest.mark.parametrize("fn,cls,vp", [(S.sample_euler, "EulerDiscreteScheduler", False),
                                       (S.sample_lms, "LMSDiscreteScheduler", False),
                                       (S.sample_dpmpp_2m, "DPMSolverMultistepScheduler", True),
                                       (S.sample_ddim, "DDIMScheduler", True)])
def test_every_step_matches(fn, cls, vp):
    """Trailing spacing; DPM-Solver and DDIM keep x_vp = x / sqrt(1 + sigma^2) internally."""
    extra = {"clip_sample": False} if cls == "DDIMScheduler" else {}
    ref = getattr(diffusers, cls)(**{**SD, "timestep_spacing": "trailing", "steps_offset": 0}, **extra)
    seen = []
    run_ours(fn, ref, callback=lambda d: seen.append(d["x"] * (vp_scale(torch.tensor(d["sigma_next"]))
                                                               if vp else 1)))
    _, traj = run_ref(ref, vp=vp, trajectory=True)
    assert len(seen) == len(traj) == STEPS
    for a, b in zip(seen, traj):
        close(a, b)


def test_euler_ancestral():
    ref = diffusers.EulerAncestralDiscreteScheduler(**SD)
    ours, _ = run_ours(S.sample_euler_ancestral, ref)
    close(ours, run_ref(ref, vp=False))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim(eta):
    ref = diffusers.DDIMScheduler(**SD, set_alpha_to_one=True, clip_sample=False)
    ref.set_timesteps(STEPS)
    ours, _ = run_ours(S.sample_ddim, ref, eta=eta)
    close(ours, run_ref(ref, vp=True, eta=eta))


def test_ddim_sd_final_alpha():
    """SD's configs keep ``set_alpha_to_one=False``: the last step lands on sigma(t=0), not 0."""
    ref = diffusers.DDIMScheduler(**SD, set_alpha_to_one=False, clip_sample=False)
    schedule = DiscreteSchedule(ref.alphas_cumprod, steps_offset=1)
    sigmas = schedule.sampling_sigmas(STEPS)
    sigmas[-1] = schedule.sigmas[0]
    ours, _ = run_ours(S.sample_ddim, ref, sigmas=sigmas)
    close(ours * vp_scale(sigmas[-1]), run_ref(ref, vp=True))


def test_ddpm():
    ref = diffusers.DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_small")
    ours, _ = run_ours(S.sample_ddpm, ref)
    close(ours, run_ref(ref, vp=True))


def test_pndm():
    ref = diffusers.PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=True)
    ours, _ = run_ours(S.sample_plms, ref)
    close(ours, run_ref(ref, vp=True))


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("algo,fn", [("dpmsolver++", S.sample_dpmpp_2m),
                                     ("sde-dpmsolver++", S.sample_dpmpp_2m_sde)])
def test_dpm_solver(algo, fn, karras):
    cfg = {**SD, "timestep_spacing": "trailing", "steps_offset": 0}
    ref = diffusers.DPMSolverMultistepScheduler(**cfg, algorithm_type=algo, solver_order=2,
                                                use_karras_sigmas=karras)
    sigmas = None
    if karras:  # diffusers' DPM-Solver spans the full training range, not the spaced one
        sch = DiscreteSchedule(ref.alphas_cumprod)
        sigmas = append_zero(karras_sigmas(STEPS, sch.sigma_min, sch.sigma_max))
    ours, _ = run_ours(fn, ref, sigmas=sigmas, round_t=karras)
    close(ours, run_ref(ref, vp=True, explicit_noise=algo.startswith("sde")))


def test_dpm_solver_leading_timesteps():
    """diffusers' DPM-Solver spaces 'leading' its own way; the sampler agrees on its timesteps."""
    ref = diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(STEPS)
    ts = ref.timesteps.clone()
    schedule = DiscreteSchedule(ref.alphas_cumprod)
    sigmas = torch.cat([schedule.t_to_sigma(ts.double()), torch.zeros(1, dtype=torch.float64)])
    ours, _ = run_ours(S.sample_dpmpp_2m, ref, sigmas=sigmas)
    close(ours, run_ref(ref, vp=True, timesteps=ts.tolist()))
