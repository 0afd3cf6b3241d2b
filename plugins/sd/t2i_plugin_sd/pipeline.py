"""Text-to-image and image-to-image generation with a :class:`StableDiffusion` model.

The denoiser is the engine's parameterization wrapper, so any registered sampler runs any
prediction type; classifier-free guidance (Ho & Salimans 2022) batches the unconditional and
conditional branches in one forward and mixes their x0 estimates (equivalent to mixing eps or v,
as the wrapper is affine in the network output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from t2i_engine.diffusion.parameterization import DenoiserWrapper
from t2i_engine.diffusion.samplers import img2img_start
from t2i_engine.interfaces import Conditioning, Sampler
from t2i_plugin_sd.model import StableDiffusion
from t2i_plugin_sd.text_encoder import check_prompts


def guided_denoiser(model: StableDiffusion, cond: Conditioning, uncond: Conditioning, *,
                    scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Sampler-space ``D(x, sigma) -> x0`` with classifier-free guidance of strength ``scale``."""
    wrapper = DenoiserWrapper(model.unet, model.schedule)
    if scale == 1.0:
        return wrapper.bind(cond)
    both = Conditioning.cat([uncond, cond])

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        x0_u, x0_c = wrapper(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return x0_u + scale * (x0_c - x0_u)

    return denoise


@torch.no_grad()
def generate(model: StableDiffusion, prompts: Sequence[str], noise: Tensor, *, sampler: Sampler, steps: int,
             guidance_scale: float = 7.5, negative_prompts: Sequence[str] | None = None,
             init_images: Tensor | None = None, strength: float = 0.8,
             generator: torch.Generator | None = None, callback=None) -> Tensor:  # noqa: ANN001
    """Images ``(B, 3, H, W)`` in [0, 1] for ``prompts``.

    ``noise`` ``(B, C, h, w)`` is the unit-variance starting noise (its size sets the image size).
    With ``init_images`` ``(B, 3, H, W)`` in [-1, 1] the run starts part-way (img2img,
    ``strength`` in (0, 1]); the same ``noise`` noises the encoded image.
    """
    prompts = check_prompts(prompts)
    negative = check_prompts(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    if len(negative) != len(prompts) or noise.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts, {len(negative)} negative prompts and {noise.shape[0]} noise "
                         "tensors: they must match")
    device = next(model.unet.parameters()).device
    noise = noise.to(device)
    cond = Conditioning(text=model.text_encoder.encode(prompts))
    uncond = Conditioning(text=model.text_encoder.encode(negative))
    denoiser = guided_denoiser(model, cond, uncond, scale=guidance_scale)
    sigmas = model.schedule.sampling_sigmas(steps, device=device).to(noise.dtype)
    if init_images is None:
        # a VP model's unit-variance noise at sigma_max, in sigma space
        x = noise * (1 + sigmas[0] ** 2).sqrt()
    else:
        latents = model.vae.encode(init_images.to(device, noise.dtype), generator=generator)
        sigmas, x = img2img_start(latents, sigmas, strength=strength, noise=noise)
    latents = sampler(denoiser, x, sigmas, generator=generator, callback=callback)
    return (model.vae.decode(latents) / 2 + 0.5).clamp(0, 1)
