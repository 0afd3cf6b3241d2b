"""Edits through edit_images() against diffusers' StableDiffusionInstructPix2PixPipeline on the same
diffusers-saved folder (loaded back with from_pretrained), source PNGs, noise and generator, with
DDIM and Euler ancestral swapped in with from_config; images at 1e-3, including diffusers' gate
(no guidance unless guidance_scale > 1 and image_guidance_scale >= 1)."""

from __future__ import annotations

import functools

import pytest
import torch

from t2i_engine.diffusion.registry import SAMPLERS
from t2i_plugin_instructpix2pix.edit import edit_images, guidance_applies, load_source
from t2i_plugin_sd.formats import DiffusersFolder
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

from .conftest import source_png

diffusers = pytest.importorskip("diffusers")

PROMPTS, NEGATIVE = ["make it red", "turn the square into a circle"], ["", "blurry"]
STEPS, TOL = 6, 1e-3
SCHEDULERS = {"ddim": "DDIMScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler"}


@functools.lru_cache(maxsize=2)
def _engine(folder):
    return build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"])


@functools.lru_cache(maxsize=2)
def _pipe(folder):
    return diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False)


def _noise():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def _sources(tmp_path):
    return [source_png(tmp_path / f"src{i}.png", seed=i) for i in range(2)]


def _reference(folder, scheduler, paths, *, s_t, s_i):
    from PIL import Image

    pipe = _pipe(folder)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    images = [Image.open(p).convert("RGB") for p in paths]
    return pipe(PROMPTS, image=images, negative_prompt=NEGATIVE, latents=_noise(), num_inference_steps=STEPS,
                guidance_scale=s_t, image_guidance_scale=s_i, output_type="pt",
                generator=torch.Generator().manual_seed(11)).images


def _ours(folder, sampler, paths, *, s_t, s_i):
    model = _engine(folder)
    sources = torch.cat([load_source(str(p), factor=model.autoencoder.downsample_factor) for p in paths])
    s = SAMPLERS[sampler](SAMPLERS[sampler].Config(steps=STEPS))
    out = edit_images(model, PROMPTS, sources, _noise(), sampler=s, text_scale=s_t, image_scale=s_i,
                      negative_prompts=NEGATIVE, generator=torch.Generator().manual_seed(11))
    return out / 2 + 0.5


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("s_t,s_i", [(7.5, 1.5), (3.0, 1.0), (5.0, 0.5), (1.0, 1.5)])
def test_matches_diffusers(ip2p_folder, tmp_path, sampler, s_t, s_i):
    paths = _sources(tmp_path)
    ref = _reference(ip2p_folder, SCHEDULERS[sampler], paths, s_t=s_t, s_i=s_i)
    got = _ours(ip2p_folder, sampler, paths, s_t=s_t, s_i=s_i)
    assert got.shape == ref.shape == (2, 3, 16, 16)
    assert (got - ref).abs().max() <= TOL


def test_gate_is_diffusers():
    assert guidance_applies(7.5, 1.5) and guidance_applies(1.01, 1.0)
    assert not guidance_applies(1.0, 1.5) and not guidance_applies(7.5, 0.99)


def test_scales_act(ip2p_folder, tmp_path):
    """Each scale changes the image (the test above could pass with a scale ignored on both sides)."""
    paths = _sources(tmp_path)
    base = _ours(ip2p_folder, "ddim", paths, s_t=7.5, s_i=1.5)
    assert (base - _ours(ip2p_folder, "ddim", paths, s_t=3.0, s_i=1.5)).abs().max() > 1e-2
    assert (base - _ours(ip2p_folder, "ddim", paths, s_t=7.5, s_i=1.2)).abs().max() > 1e-2
