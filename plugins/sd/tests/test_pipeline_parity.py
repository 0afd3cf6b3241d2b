"""Pipeline parity: the core's generate() (what the sample task runs) with our Stable Diffusion
model against diffusers' StableDiffusionPipeline on the same tiny components, prompts, negative
prompts, initial latents and scheduler (guidance 7.5, from the core's GuidanceConfig)."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.diffusion.registry import SAMPLERS, DDIMConfig, SamplerConfig
from t2i_engine.interfaces import LatentDiffusionModel, missing_members
from t2i_engine.pipeline import generate
from t2i_plugin_sd.formats import DiffusersFolder
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

from .conftest import tiny_pipeline


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("layout", ["sd1", "sd2v"])
def test_pipeline_matches_diffusers(kind, layout, sd1_folder, sd2v_folder):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from diffusers import StableDiffusionPipeline

    _, folder = sd1_folder if layout == "sd1" else sd2v_folder
    weights = DiffusersFolder().load(str(folder))
    # the folder as a diffusers user loads it and swaps schedulers: its saved config has
    # timestep_spacing 'leading' and set_alpha_to_one false; DPM-Solver spaces 'leading' its own way
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    if kind == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        sampler = SAMPLERS["ddim"](DDIMConfig(steps=6))
    else:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        sampler = SAMPLERS["dpmpp_2m"](SamplerConfig(steps=6))
    ours = build_model(weights, PRESETS["sd-1"])
    assert missing_members(ours, LatentDiffusionModel) == []
    prompts, negative = ["a red square", "a blue circle"], ["", "green"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe(prompts, negative_prompt=negative, latents=noise.clone(), num_inference_steps=6, guidance_scale=7.5,
               height=16, width=16, output_type="pt").images
    got = generate(ours, prompts, noise, sampler=sampler, guidance=GuidanceConfig(guidance_scale=7.5),
                   negative_prompts=negative) / 2 + 0.5
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-3


def test_img2img_matches_diffusers(sd1_folder):
    """img2img (strength 0.5, DDIM 6 steps -> 3 run) against StableDiffusionImg2ImgPipeline.

    diffusers takes 4-channel input as ready latents, so it gets our encoded posterior mean; its
    noise is drawn from the seeded generator, which is what we pass as ``noise``."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    pipe, folder = sd1_folder
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    # from the saved folder: other tests swap the shared pipeline's scheduler
    img2img.scheduler = DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    ours = build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"])
    source = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = ours.autoencoder.encode(source)  # (1, 4, 8, 8), scaled posterior mean
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = img2img(["a red square"], image=latents, strength=0.5, num_inference_steps=6, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(4), output_type="pt").images
    got = generate(ours, ["a red square"], noise, sampler=SAMPLERS["ddim"](DDIMConfig(steps=6)),
                   guidance=GuidanceConfig(guidance_scale=7.5), init_images=source, strength=0.5) / 2 + 0.5
    assert (got - ref).abs().max() <= 1e-3


def test_winograd_convolutions_match_diffusers(tmp_path, monkeypatch):
    """A model wide and large enough that its 3x3 convolutions take Winograd F(4x4, 3x3) (64 and 96
    channels; 16x16 latents in a guidance batch of 4: 64 tiles; the VAE's 32x32 level), prepared as
    the sample task prepares it, against diffusers' pipeline on the same folder."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from t2i_engine.kernels.dense import dispatch
    from t2i_engine.tasks.common import prepare_for_inference

    calls = []
    real = dispatch.winograd_conv2d
    monkeypatch.setattr(dispatch, "winograd_conv2d", lambda *a: calls.append(a[0].shape) or real(*a))
    ref_pipe = tiny_pipeline(tokenizer_dir=tmp_path / "tok", unet_channels=(64, 96), vae_channels=(64, 96))
    ref_pipe.save_pretrained(tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    ours = build_model(DiffusersFolder().load(str(tmp_path / "pipe")), PRESETS["sd-1"])
    prepare_for_inference(ours)
    prompts = ["a red square", "a blue circle"]
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    ref = pipe(prompts, latents=noise.clone(), num_inference_steps=4, guidance_scale=7.5, height=32, width=32,
               output_type="pt").images
    got = generate(ours, prompts, noise, sampler=SAMPLERS["dpmpp_2m"](SamplerConfig(steps=4)),
                   guidance=GuidanceConfig(guidance_scale=7.5)) / 2 + 0.5
    assert {s[1] for s in calls} >= {64, 96} and any(s[-1] == 32 for s in calls)  # UNet and VAE layers
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-3


def test_bf16_autoencoder_in_channels_last_matches_diffusers(tmp_path):
    """Under bf16 autocast the sample task puts a CPU autoencoder in channels_last (where this CPU
    has oneDNN's bf16 convolution). Its decode and encode against diffusers' VAE loaded from the
    folder: within what diffusers' own bf16 autocast run differs from its float32 one."""
    from diffusers import AutoencoderKL

    from t2i_engine.kernels import cpu_paths
    from t2i_engine.tasks.common import prepare_for_inference

    if cpu_paths.unsupported_reason("channels_last_bf16") is not None:
        pytest.skip(f"no oneDNN bf16 convolution here: {cpu_paths.unsupported_reason('channels_last_bf16')}")
    tiny_pipeline(tokenizer_dir=tmp_path / "tok", vae_channels=(32, 96)).save_pretrained(tmp_path / "pipe")
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "pipe"), subfolder="vae").eval()
    ours = build_model(DiffusersFolder().load(str(tmp_path / "pipe")), PRESETS["sd-1"])
    prepare_for_inference(ours, autocast_dtype=torch.bfloat16)
    convs = [m.weight for m in ours.autoencoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    g = torch.Generator().manual_seed(6)
    z, images = torch.randn(1, 4, 12, 12, generator=g), torch.rand(1, 3, 24, 24, generator=g) * 2 - 1
    sf = vae.config.scaling_factor
    with torch.inference_mode():
        exact = vae.decode(z / sf).sample, vae.encode(images).latent_dist.mean * sf
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = vae.decode(z / sf).sample.float(), vae.encode(images).latent_dist.mean.float() * sf
            got = ours.autoencoder.decode(z).float(), ours.autoencoder.encode(images).float()
    assert got[0].is_contiguous(memory_format=torch.channels_last)  # the layout really ran
    for mine, reference, want in zip(got, theirs, exact, strict=True):
        assert mine.shape == want.shape
        assert (mine - want).abs().mean() <= 1.5 * (reference - want).abs().mean() + 1e-3
