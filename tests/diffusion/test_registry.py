"""Registry: every factory builds a working object; bad config values are rejected."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.diffusion.registry import SAMPLERS, SCHEDULES, build
from t2i_engine.diffusion.samplers import img2img_start
from t2i_engine.diffusion.schedules import DiscreteSchedule
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import NoiseSchedule, Sampler, missing_members


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_build(name):
    factory = SCHEDULES[name]
    schedule = factory(factory.Config())
    assert missing_members(schedule, NoiseSchedule) == []
    sig = schedule.sampling_sigmas(6)
    assert sig.shape == (7,) and float(sig[-1]) == 0 and bool((sig[1:] < sig[:-1]).all())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_build_and_run(name):
    factory = SAMPLERS[name]
    sampler = factory(factory.Config(steps=4))
    assert isinstance(sampler, Sampler)
    sigmas = sampler.sigmas(DiscreteSchedule.from_betas("scaled_linear", steps_offset=1))
    assert sigmas.shape == (5,)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    out = sampler(lambda x, s: 0.5 * x / (1 + s.reshape(-1, 1) ** 2), x, sigmas,
                  generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_karras_option():
    sched = DiscreteSchedule.from_betas("scaled_linear", steps_offset=1)
    plain = build(SAMPLERS, "euler", steps=10).sigmas(sched)
    k = build(SAMPLERS, "euler", steps=10, karras=True).sigmas(sched)
    assert float(k[0]) == pytest.approx(float(plain[0])) and float(k[-2]) == pytest.approx(float(plain[-2]))
    assert not torch.allclose(k, plain)


@pytest.mark.parametrize("name,options", [
    ("euler", {"steps": 0}), ("euler", {"steps": 2.5}), ("euler", {"steps": "10"}),
    ("ddim", {"eta": "x"}), ("ddim", {"eta": 2.0}), ("euler", {"karras": "yes"}),
    ("lms", {"order": 5}), ("euler", {"nope": 1}), ("scaled_linear", {"spacing": "middle"}),
])
def test_bad_config(name, options):
    registry = SCHEDULES if name in SCHEDULES else SAMPLERS
    with pytest.raises(ConfigError):
        build(registry, name, **options)
    with pytest.raises((TypeError, ValueError)):
        registry[name].Config(**options)


def test_unknown_name():
    with pytest.raises(ConfigError, match="did you mean 'euler_ancestral'"):
        build(SAMPLERS, "euler_ancestrl")


def test_img2img_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, steps_offset=1, timestep_spacing="leading")
    ref.set_timesteps(10)
    sched = DiscreteSchedule(ref.alphas_cumprod, steps_offset=1)
    x0 = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for strength in (0.3, 0.75, 1.0):
        tail, x = img2img_start(x0, sched.sampling_sigmas(10), strength=strength, noise=noise)
        init = min(int(10 * strength), 10)  # StableDiffusionImg2ImgPipeline.get_timesteps
        ts = ref.timesteps[10 - init:]
        torch.testing.assert_close(tail[:-1].float(), ref.sigmas[10 - init:-1])
        torch.testing.assert_close(x, ref.add_noise(x0, noise, ts[:1]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strength", [0, 0.0, -0.1, 1.5, "0.5", True])
def test_img2img_bad_strength(strength):
    with pytest.raises(ConfigError):
        img2img_start(torch.zeros(1, 1), torch.tensor([1.0, 0.0]), strength=strength)
