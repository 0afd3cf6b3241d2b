"""Model-agnostic text-to-image generation over any :class:`~t2i_engine.interfaces.LatentDiffusionModel`.

One loop for every model plugin (Stable Diffusion, and the next ones):

1. prompts -> :class:`~t2i_engine.interfaces.Conditioning` for the prompts and for the negative
   prompts (``""`` is the unconditional input, the same one caption dropout trains);
2. the raw network wrapped by :class:`~t2i_engine.diffusion.parameterization.DenoiserWrapper`
   into ``D(x, sigma, cond) -> x0``, then by the guidance chain of
   :func:`~t2i_engine.diffusion.guidance.guided_denoiser` (classifier-free guidance, Ho & Salimans
   2022, batching cond and uncond in one forward; optional rescale and thresholding);
3. any registered sampler over the sigma sequence it asks for (its own ``steps`` / ``karras``);
4. txt2img starts from noise at ``sigmas[0]``; img2img (SDEdit, Meng et al. 2022) encodes the
   source image and starts part-way down the sigmas (:func:`~t2i_engine.diffusion.samplers.img2img_start`);
5. the autoencoder decodes the latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from t2i_engine.diffusion.guidance import GuidanceConfig, guided_denoiser
from t2i_engine.diffusion.parameterization import DenoiserWrapper
from t2i_engine.diffusion.samplers import img2img_start
from t2i_engine.interfaces import (
    Conditioning, LatentDiffusionModel, NoiseSchedule, Sampler, StepCallback, TextEncoder,
)
from t2i_engine.utils.cpu_memory import release_free_memory, retain_freed_memory

__all__ = ["check_prompts", "encode_prompts", "generate", "sampling_sigmas_for", "seeded_noise", "start_noise_scale"]


def check_prompts(prompts: Any, *, what: str = "prompts") -> list[str]:
    """``prompts`` as a list of str; anything else (a bare str, numbers) is a TypeError saying what came."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{what} must be a list of str, got {type(prompts).__name__}: {prompts!r:.80}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must be a list of str; got an item of type {type(bad[0]).__name__}: {bad[0]!r:.80}")
    return list(prompts)


def encode_prompts(text_encoder: TextEncoder, prompts: Sequence[str],
                   negative_prompts: Sequence[str] | None = None) -> tuple[Conditioning, Conditioning]:
    """``(cond, uncond)`` for ``prompts`` and ``negative_prompts`` (default: ``""`` each)."""
    prompts = check_prompts(prompts)
    negative = check_prompts(negative_prompts, what="negative prompts") if negative_prompts is not None \
        else [""] * len(prompts)
    if len(negative) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative)} negative prompts")
    return Conditioning(text=text_encoder.encode(prompts)), Conditioning(text=text_encoder.encode(negative))


def start_noise_scale(schedule: NoiseSchedule, sigma: Tensor) -> Tensor:
    """The std of the starting sample at ``sigma`` for unit-variance noise.

    Variance-preserving schedules (discrete DDPM betas, VP cosine) start from unit-variance noise
    in VP space, i.e. ``sqrt(1 + sigma^2)`` in sigma space (diffusers' ``init_noise_sigma``); EDM
    (variance exploding) starts from ``sigma``. A schedule may say which with a boolean
    ``variance_preserving`` attribute.
    """
    from t2i_engine.diffusion.schedules import EDMSchedule

    vp = getattr(schedule, "variance_preserving", not isinstance(schedule, EDMSchedule))
    return (1 + sigma**2).sqrt() if vp else sigma


def seeded_noise(seeds: Sequence[int], shape: tuple[int, int, int], *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit-variance starting noise ``(len(seeds), *shape)``, each image's from its own seed.

    Drawn on the CPU so that a seed gives the same image on any device and in any batch.
    """
    return torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(int(s)))
                      for s in seeds]).to(dtype)


def sampling_sigmas_for(sampler: Sampler, schedule: NoiseSchedule, *, steps: int | None = None,
                        device: torch.device | None = None) -> Tensor:
    """The sigmas ``sampler`` walks: its own ``sigmas(schedule)`` (registered samplers carry
    ``steps`` and ``karras`` in their config), else ``steps`` of the schedule's spacing."""
    own = getattr(sampler, "sigmas", None)
    if callable(own) and steps is None:
        return own(schedule, device=device)
    if steps is None:
        raise TypeError("a bare sampler function needs steps= (or pass sigmas=)")
    return schedule.sampling_sigmas(steps, device=device)


@torch.no_grad()
def generate(model: LatentDiffusionModel, prompts: Sequence[str], noise: Tensor, *, sampler: Sampler,
             sigmas: Tensor | None = None, guidance: GuidanceConfig | None = None,
             negative_prompts: Sequence[str] | None = None, init_images: Tensor | None = None,
             strength: float = 0.8, generator: torch.Generator | None = None,
             callback: StepCallback | None = None) -> Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1] for ``prompts``.

    Args:
        model: the bundle (text encoder, autoencoder, denoiser network, schedule).
        prompts: one prompt per image (a list of str).
        noise: ``(B, C, h, w)`` unit-variance starting noise; its size sets the image size.
        sampler: any sampler; a registered one supplies its own sigmas.
        sigmas: the sigma sequence, overriding the sampler's (``steps + 1`` values ending in 0).
        guidance: CFG scale, rescale, thresholding (default ``GuidanceConfig()``: scale 7.5).
        negative_prompts: what guidance steers away from; default ``""`` (unconditional).
        init_images: ``(B, 3, H, W)`` in [-1, 1] for img2img; the same ``noise`` noises them.
        strength: img2img, fraction of the steps run, in (0, 1].
        generator: randomness of stochastic samplers and of the img2img posterior sample.
        callback: called after each sampler step (see :data:`~t2i_engine.interfaces.StepCallback`).
    """
    prompts = check_prompts(prompts)
    if noise.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {noise.shape[0]} noise tensors")
    device = next(model.denoiser.parameters()).device
    if device.type == "cpu":
        retain_freed_memory()  # else glibc page-faults every freed activation / weight cast back in
    noise = noise.to(device)
    cond, uncond = encode_prompts(model.text_encoder, prompts, negative_prompts)
    denoiser = guided_denoiser(DenoiserWrapper(model.denoiser, model.schedule), guidance or GuidanceConfig(),
                               cond=cond, uncond=uncond)
    if sigmas is None:
        sigmas = sampling_sigmas_for(sampler, model.schedule, device=device)
    sigmas = sigmas.to(device=device, dtype=noise.dtype)
    if init_images is None:
        x = noise * start_noise_scale(model.schedule, sigmas[0])
    else:
        latents = model.autoencoder.encode(init_images.to(device, noise.dtype), generator=generator)
        sigmas, x = img2img_start(latents, sigmas, strength=strength, noise=noise)
    latents = sampler(denoiser, x, sigmas, generator=generator, callback=callback)
    if device.type == "cpu":
        release_free_memory()  # the loop's free blocks: the decoder's larger activations refill pages
    images = model.autoencoder.decode(latents).clamp_(-1, 1)
    if device.type == "cpu":
        release_free_memory()
    return images
