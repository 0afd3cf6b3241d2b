"""The ``edm`` sampler and Euler/Heun with ``s_churn`` against k-diffusion (Crowson's reference
implementation of Karras et al. 2022), on the same discrete eps model, sigmas and noise.

k-diffusion's own ``DiscreteEpsDDPMDenoiser`` wraps the model on its side (log-linear sigma to t),
ours is :class:`DenoiserWrapper`; k-diffusion draws its churn noise from the global RNG, ours
from a generator seeded alike.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from t2i_engine.diffusion.parameterization import DenoiserWrapper
from t2i_engine.diffusion.registry import SAMPLERS
from t2i_engine.diffusion.samplers import sample_euler, sample_heun
from t2i_engine.diffusion.schedules import DiscreteSchedule, karras_sigmas, append_zero
from t2i_engine.interfaces import Conditioning, DenoiserNet

SEED = 5


def _kdiffusion():
    """k_diffusion's sampling and external modules without its package __init__ (which imports
    CLIP, wandb and the training code)."""
    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            pytest.skip("k-diffusion is not installed")
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
    import k_diffusion.external as external
    import k_diffusion.sampling as sampling

    return sampling, external


def eps_fn(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.float64).reshape(-1, *([1] * (x_vp.ndim - 1)))
    return 0.7 * x_vp + 0.2 * torch.tanh(x_vp) + 0.1 * torch.cos(t / 300.0)


class EpsNet(DenoiserNet):
    prediction = "eps"

    def forward(self, x_t, t, cond):
        return eps_fn(x_t, t)


def _models():
    sampling, external = _kdiffusion()
    schedule = DiscreteSchedule.from_betas("scaled_linear")
    ref = external.DiscreteEpsDDPMDenoiser(eps_fn, schedule.alphas_cumprod, quantize=False)
    ours = DenoiserWrapper(EpsNet(), schedule).bind(Conditioning())
    return sampling, ref, ours, schedule


def _start():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _run_ref(fn, ref, x, sigmas, **kw):
    torch.manual_seed(SEED)
    return fn(ref, x.clone(), sigmas, disable=True, **kw)


def test_edm_sampler_matches_kdiffusion():
    """``edm`` (Heun + churn with EDM's S_churn 40, S_tmin 0.05, S_tmax 50, S_noise 1.003) on
    Karras sigmas equals k-diffusion's ``sample_heun`` with those options."""
    sampling, ref, ours, schedule = _models()
    sigmas = append_zero(karras_sigmas(12, schedule.sigma_min, schedule.sigma_max))
    edm = SAMPLERS["edm"](SAMPLERS["edm"].Config(steps=12))
    c = edm.config
    x = _start() * sigmas[0]
    want = _run_ref(sampling.sample_heun, ref, x, sigmas, s_churn=c.s_churn, s_tmin=c.s_tmin, s_tmax=c.s_tmax,
                    s_noise=c.s_noise)
    got = edm(ours, x.clone(), sigmas, generator=torch.Generator().manual_seed(SEED))
    assert (got - want).abs().max() < 5e-15  # float64: about 10x the measured 4e-16
    assert (got - edm(ours, x.clone(), sigmas, generator=torch.Generator().manual_seed(SEED + 1))).abs().max() > 1e-3


@pytest.mark.parametrize("ours_fn,name", [(sample_euler, "sample_euler"), (sample_heun, "sample_heun")])
@pytest.mark.parametrize("s_tmin,s_tmax", [(0.0, float("inf")), (0.5, 5.0)])
def test_churn_matches_kdiffusion(ours_fn, name, s_tmin, s_tmax):
    """``s_churn`` on Euler and Heun, on k-diffusion's own discrete sigma grid (``get_sigmas``);
    a churn window that leaves steps out still consumes noise as k-diffusion does."""
    sampling, ref, ours, _ = _models()
    sigmas = ref.get_sigmas(10).double()
    x = _start() * sigmas[0]
    opts = dict(s_churn=3.0, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=1.0)
    want = _run_ref(getattr(sampling, name), ref, x, sigmas, **opts)
    got = ours_fn(ours, x.clone(), sigmas, generator=torch.Generator().manual_seed(SEED), **opts)
    assert (got - want).abs().max() < 5e-15  # measured 4e-16
