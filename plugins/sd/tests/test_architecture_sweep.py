"""Architecture is read, not assumed: randomized tiny Stable Diffusion architectures built and saved
by diffusers/transformers, loaded by the engine, images compared with ``StableDiffusionPipeline``.

Each case draws GroupNorm groups and eps, heads and transformer depth per level, layers per block,
1x1 or linear projections, the timestep-embedding layout, the text tower's width, heads, layers,
MLP width, activation and LayerNorm eps, eps or v prediction, and one of the samplers, swapped in
the way a diffusers user does it (``<Scheduler>.from_config(pipe.scheduler.config)``) on a folder
whose scheduler config is SD 1.5's (a PNDMScheduler with no ``timestep_spacing`` key).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.diffusion.registry import SAMPLERS
from t2i_engine.pipeline import generate
from t2i_plugin_sd.formats import SingleFile, load_checkpoint
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS
from t2i_plugin_sd.tokenizer_files import write_clip_tokenizer

diffusers = pytest.importorskip("diffusers")

SAMPLER_SCHEDULERS = {
    "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler", "pndm": "PNDMScheduler",
}
SD15_SCHEDULER = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as users hold it
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


def _divisor(rng: random.Random, n: int, options: tuple[int, ...]) -> int:
    return rng.choice([d for d in options if n % d == 0])


def random_architecture(seed: int, *, ldm_expressible: bool = False) -> dict[str, Any]:
    """Constructor kwargs for a random tiny UNet, VAE and CLIP text tower (``ldm_expressible``:
    only what a latent-diffusion yaml can describe: 32 groups, one head count, default eps)."""
    rng = random.Random(seed)
    levels = rng.choice([2, 3])
    c0 = 32 if ldm_expressible else rng.choice([16, 24, 32])
    channels = [c0 * m for m in rng.choice([(1, 2, 2), (1, 2, 4), (1, 1, 2)])[:levels]]
    groups = 32 if ldm_expressible else _divisor(rng, c0, (4, 8, 16))
    attention = [rng.random() < 0.7 for _ in range(levels)]
    attention[0] = True
    heads = [_divisor(rng, c, (1, 2, 4)) for c in channels]
    if ldm_expressible:
        heads = [2] * levels
    text_width = rng.choice([32, 48])
    unet = dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
        layers_per_block=rng.choice([1, 2]), norm_num_groups=groups,
        norm_eps=1e-5 if ldm_expressible else rng.choice([1e-5, 1e-6, 1e-3]),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=text_width, attention_head_dim=tuple(heads),
        transformer_layers_per_block=tuple(rng.choice([1, 2]) for _ in range(levels)),
        use_linear_projection=rng.random() < 0.5, upcast_attention=rng.random() < 0.5,
        flip_sin_to_cos=True if ldm_expressible else rng.random() < 0.7,
        freq_shift=0 if ldm_expressible else rng.choice([0, 1]))
    v0 = 32 if ldm_expressible else rng.choice([16, 32])
    vae_groups = 32 if ldm_expressible else _divisor(rng, v0, (4, 8, 16))
    vae_levels = rng.choice([2, 3])
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(v0,) * vae_levels,
               down_block_types=("DownEncoderBlock2D",) * vae_levels, up_block_types=("UpDecoderBlock2D",) * vae_levels,
               layers_per_block=rng.choice([1, 2]), norm_num_groups=vae_groups, sample_size=16,
               scaling_factor=rng.choice([0.18215, 0.5, 1.3]))
    act = rng.choice(["quick_gelu", "gelu"])
    text = dict(vocab_size=49408, hidden_size=text_width, intermediate_size=rng.choice([2, 3, 4]) * text_width + 8,
                num_hidden_layers=rng.choice([1, 2, 3]), num_attention_heads=rng.choice([2, 4]),
                max_position_embeddings=77, hidden_act=act, layer_norm_eps=rng.choice([1e-5, 1e-6]),
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if act == "quick_gelu" else 0)
    return {"unet": unet, "vae": vae, "text": text, "v": rng.random() < 0.5, "pad": "eos" if act == "quick_gelu" else "zero",
            "sampler": list(SAMPLER_SCHEDULERS)[seed % len(SAMPLER_SCHEDULERS)], "factor": 2 ** (vae_levels - 1)}


def save_diffusers_folder(arch: dict[str, Any], root: Path) -> Path:
    """Build the components with diffusers/transformers, save them as a pipeline folder, then give
    it SD 1.5's own scheduler config (no ``timestep_spacing``)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    write_clip_tokenizer(root / "tok", pad=arch["pad"])
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**arch["unet"]), vae=AutoencoderKL(**arch["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text"])),
        tokenizer=CLIPTokenizer.from_pretrained(str(root / "tok")), scheduler=PNDMScheduler(steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():  # random init leaves some layers zero: give every tensor a signal
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    folder = root / "pipe"
    pipe.save_pretrained(folder)
    sched = {**SD15_SCHEDULER, **({"prediction_type": "v_prediction"} if arch["v"] else {})}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return folder


def run_both(folder: Path, arch: dict[str, Any], sampler: str, *, steps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(diffusers image, engine image) in [0, 1] for the same prompts, noise and sampler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.scheduler = getattr(diffusers, SAMPLER_SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ours = build_model(load_checkpoint(str(folder)), PRESETS["sd-1"])
    prompts, negative = ["a red square", "a blue circle"], ["", "green"]
    size = 8 * arch["factor"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe(prompts, negative_prompt=negative, latents=noise.clone(), num_inference_steps=steps,
               guidance_scale=7.5, height=size, width=size, output_type="pt",
               generator=torch.Generator().manual_seed(5)).images
    got = generate(ours, prompts, noise, sampler=SAMPLERS[sampler](SAMPLERS[sampler].Config(steps=steps)),
                   guidance=GuidanceConfig(guidance_scale=7.5), negative_prompts=negative,
                   generator=torch.Generator().manual_seed(5)) / 2 + 0.5
    return ref, got


@pytest.mark.parametrize("seed", range(8))
def test_random_architecture_matches_diffusers(seed, tmp_path):
    arch = random_architecture(seed)
    folder = save_diffusers_folder(arch, tmp_path)
    ref, got = run_both(folder, arch, arch["sampler"])
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= 1e-3, f"{arch['sampler']}: max error {err:.2e} for {arch}"


@pytest.mark.filterwarnings("ignore:.*latent-diffusion yaml cannot express")
@pytest.mark.parametrize("seed", [0, 1])
def test_single_file_export_loads_in_diffusers(seed, tmp_path):
    """Our single file + its LDM yaml through diffusers' own converters
    (``from_single_file(original_config=..., config=folder)``, offline) gives the folder's images."""
    from diffusers import StableDiffusionPipeline

    arch = random_architecture(seed, ldm_expressible=True)
    folder = save_diffusers_folder(arch, tmp_path)
    model = build_model(load_checkpoint(str(folder)), PRESETS["sd-1"])
    SingleFile().save(model, str(tmp_path / "m.safetensors"))
    single = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "m.safetensors"), original_config=str(tmp_path / "m.yaml"), config=str(folder),
        local_files_only=True)
    single.set_progress_bar_config(disable=True)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert single.unet.config.block_out_channels == pipe.unet.config.block_out_channels
    def depth(unet):
        d, n = unet.config.transformer_layers_per_block, len(unet.config.block_out_channels)
        return [d] * n if isinstance(d, int) else list(d)

    assert depth(single.unet) == depth(pipe.unet)
    size = 8 * arch["factor"]
    images = [p(["a red square"], latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
                num_inference_steps=4, height=size, width=size, output_type="pt").images for p in (single, pipe)]
    assert (images[0] - images[1]).abs().max() <= 1e-4
    # and the engine reads its own export back as the same architecture, with no preset
    assert build_model(load_checkpoint(str(tmp_path / "m.safetensors")), PRESETS["sd-1"]).arch == model.arch


@pytest.mark.parametrize("seed", range(8, 16))
def test_random_architecture_components_match(seed, tmp_path):
    """Each network alone, on the same inputs: UNet output, VAE decode/encode, text embeddings."""
    from diffusers import StableDiffusionPipeline

    arch = random_architecture(seed)
    folder = save_diffusers_folder(arch, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    ours = build_model(load_checkpoint(str(folder)), PRESETS["sd-1"])
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 17.0])
    prompts = ["a red square", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = pipe.text_encoder(ids).last_hidden_state
        emb = ours.text_encoder.encode(prompts)
        assert (emb.tokens - ctx).abs().max() <= 1e-5
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        got = ours.unet(x, t, _cond(ctx))
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
        z = x / pipe.vae.config.scaling_factor
        assert (ours.vae.decode(x) - pipe.vae.decode(z).sample).abs().max() <= 1e-4
        img = torch.rand(1, 3, 8 * arch["factor"], 8 * arch["factor"], generator=g) * 2 - 1
        mean = pipe.vae.encode(img).latent_dist.mean * pipe.vae.config.scaling_factor
        assert (ours.vae.encode(img) - mean).abs().max() <= 1e-4


def _cond(tokens: torch.Tensor):
    from t2i_engine.interfaces import Conditioning, TextEmbedding

    return Conditioning(text=TextEmbedding(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), tokens[:, 0]))
