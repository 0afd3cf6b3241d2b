"""IF's scheduler pieces against diffusers' DDPMScheduler: thresholding, learned-range variance,
config reading."""

from __future__ import annotations

import json

import pytest
import torch

from t2i_engine.diffusion.guidance import DynamicThreshold
from t2i_engine.errors import CheckpointError
from t2i_plugin_imagen.if_schedule import if_scheduler_config
from t2i_plugin_imagen.sampling import learned_std


def _ddpm(**kw):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                         dynamic_thresholding_ratio=0.95, sample_max_value=1.5, **kw)


def test_threshold_with_ceiling_matches_diffusers():
    x0 = torch.randn(4, 3, 8, 8) * torch.tensor([0.5, 1.2, 2.0, 4.0])[:, None, None, None]  # s below, in, above
    want = _ddpm()._threshold_sample(x0.clone())
    got = DynamicThreshold(lambda x, s: x, percentile=0.95, ceiling=1.5)(x0, torch.ones(4))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("steps", [5, 50])
def test_learned_std_matches_diffusers_variance(steps):
    sched = _ddpm()
    sched.set_timesteps(steps)
    from t2i_plugin_imagen.if_schedule import IFSchedulerConfig

    sigmas = IFSchedulerConfig().schedule().sampling_sigmas(steps)
    v = torch.rand(1, 3, 2, 2) * 2 - 1
    for i, t in enumerate(sched.timesteps[:-1]):
        vp_std = torch.exp(0.5 * sched._get_variance(int(t), predicted_variance=v))
        a_prev = 1 / (1 + sigmas[i + 1] ** 2)
        torch.testing.assert_close(learned_std(float(sigmas[i]), float(sigmas[i + 1]), v),
                                   (vp_std / a_prev.sqrt()).float(), rtol=1e-3, atol=1e-6)  # diffusers: float32 tables


def test_scheduler_config_round_trip(tmp_path):
    _ddpm(steps_offset=1).save_config(tmp_path)
    cfg = if_scheduler_config(json.loads((tmp_path / "scheduler_config.json").read_text()))
    assert (cfg.variance_type, cfg.thresholding, cfg.dynamic_thresholding_ratio, cfg.sample_max_value,
            cfg.steps_offset) == ("learned_range", True, 0.95, 1.5, 1)


@pytest.mark.parametrize(("key", "value"), [("prediction_type", "v_prediction"), ("timestep_spacing", "trailing"),
                                             ("variance_type", "fixed_large"), ("rescale_betas_zero_snr", True),
                                             ("some_new_key", 3)])
def test_scheduler_config_refuses_by_name(key, value):
    config = {"_class_name": "DDPMScheduler", key: value}
    with pytest.raises(CheckpointError, match=key):
        if_scheduler_config(config)
