"""A ``sample`` job with a ``[[conditioners]] type = "controlnet"`` entry, end to end: the PNG it
writes is diffusers' StableDiffusionControlNetPipeline image (8-bit), its keys are validated with
their line, and ``scale = 0`` is exactly the job without the entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.pipeline import seeded_noise
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config
from t2i_plugin_controlnet import plugin

from .conftest import hint_png


def _pm() -> EnginePluginManager:
    import t2i_plugin_sd.plugin

    pm = EnginePluginManager()
    pm.load(autoload=False)  # the plugins under test, whether or not they are installed
    pm.register(t2i_plugin_sd.plugin, name="sd")
    pm.register(plugin, name="controlnet")
    return pm


def _job(tmp_path: Path, sd: Path, entry: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = tmp_path / "job.toml"
    job.write_text(f"""[engine]
plugins = ["sd", "controlnet"]
device = "cpu"
output_dir = "{tmp_path / 'out'}"
[task]
name = "sample"
prompts = ["a red square"]
width = 16
height = 16
seeds = [7]
[model]
type = "stable-diffusion"
checkpoint = "{sd}"
preset = "sd-1"
[sampler]
name = "ddim"
steps = 6
[guidance]
guidance_scale = 7.5
{entry}""")
    return job


def _run(job: Path, *sets: str) -> np.ndarray:
    pm = _pm()
    summary = run_config(load_config(job, pm, overrides=sets), pm)
    return np.array(Image.open(summary["images"][0])).astype(np.int16)


def _entry(net: Path, hint: Path) -> str:
    return f'[[conditioners]]\ntype = "controlnet"\ncheckpoint = "{net}"\ninputs = {{ image = "{hint}" }}\nscale = 0.7\n'


def test_a_sample_job_draws_diffusers_image(sd_controlnets, tmp_path):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    sd, (net, _) = sd_controlnets
    hint = hint_png(tmp_path / "hint.png", seed=2)
    got = _run(_job(tmp_path, sd, _entry(net, hint)))
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(sd), controlnet=ControlNetModel.from_pretrained(str(net)), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = pipe(["a red square"], image=Image.open(hint), latents=seeded_noise([7], (4, 8, 8)), num_inference_steps=6,
               guidance_scale=7.5, height=16, width=16, controlnet_conditioning_scale=0.7, output_type="np").images[0]
    ref8 = (ref * 255).round().astype(np.int16)
    assert np.abs(got - ref8).max() <= 1
    plain = _run(_job(tmp_path / "plain", sd, ""))
    assert np.abs(got - plain).max() > 2  # the ControlNet acts
    assert np.array_equal(_run(_job(tmp_path / "zero", sd, _entry(net, hint)), "conditioners.0.scale=0.0"), plain)


def test_a_bad_key_is_named_with_its_line(sd_controlnets, tmp_path):
    sd, (net, _) = sd_controlnets
    hint = hint_png(tmp_path / "hint.png", seed=2)
    job = _job(tmp_path, sd, _entry(net, hint) + 'channel_order = "rbg"\n')
    with pytest.raises(ConfigError, match=r"conditioners\[0\]\.channel_order.*job\.toml:\d+"):
        load_config(job, _pm())


def test_a_job_without_the_hint_stops_naming_it(sd_controlnets, tmp_path):
    sd, (net, _) = sd_controlnets
    job = _job(tmp_path, sd, f'[[conditioners]]\ntype = "controlnet"\ncheckpoint = "{net}"\n')
    with pytest.raises(ConfigError, match=r"inputs = \{ image ="):
        _run(job)
