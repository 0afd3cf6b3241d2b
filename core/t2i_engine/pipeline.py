"""Model-agnostic text-to-image generation over any :class:`~t2i_engine.interfaces.LatentDiffusionModel`.

One loop for every model plugin (Stable Diffusion, and the next ones):

1. prompts -> :class:`~t2i_engine.interfaces.Conditioning` for the prompts and for the negative
   prompts (``""`` is the unconditional input, the same one caption dropout trains);
2. the raw network wrapped by :class:`~t2i_engine.diffusion.parameterization.DenoiserWrapper`
   into ``D(x, sigma, cond) -> x0``, then by the guidance chain of
   :func:`~t2i_engine.diffusion.guidance.guided_denoiser` (classifier-free guidance, Ho & Salimans
   2022, batching cond and uncond in one forward; optional rescale and thresholding);
3. any registered sampler over the plan it asks for (:func:`sampling_plan_for`: on a discrete
   schedule the timestep grid of the sampler's diffusers scheduler class, see
   :mod:`t2i_engine.diffusion.grids`); sigmas stay float64 under any model precision;
4. txt2img starts from noise at ``sigmas[0]``; img2img (SDEdit, Meng et al. 2022) encodes the
   source image and starts part-way down the sigmas (:func:`~t2i_engine.diffusion.samplers.img2img_start`);
5. the autoencoder decodes the latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from t2i_engine.conditioning.chain import ConditionerChain
from t2i_engine.diffusion.grids import SamplingPlan, default_plan, is_variance_preserving
from t2i_engine.diffusion.guidance import GuidanceConfig, StaticClip, guided_denoiser
from t2i_engine.diffusion.parameterization import DenoiserWrapper
from t2i_engine.diffusion.samplers import img2img_start
from t2i_engine.interfaces import (
    Conditioning, Denoiser, LatentDiffusionModel, NoiseSchedule, Sampler, StepCallback, TextEncoder,
)
from t2i_engine.nn.attention import reuse_context_kv
from t2i_engine.utils.cpu_memory import release_free_memory, retain_freed_memory

__all__ = ["check_prompts", "denoise", "encode_prompts", "generate", "mark_branches", "sampling_plan_for", "sampling_sigmas_for",
           "seeded_noise",
           "start_noise_scale"]


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


def mark_branches(cond: Conditioning, uncond: Conditioning) -> tuple[Conditioning, Conditioning]:
    """``(cond, uncond)`` with ``branch`` set (True on every conditional row, False on the
    unconditional ones), so the conditioner chain knows the rows of guidance's batch."""
    def mark(c: Conditioning, flag: bool) -> Conditioning:
        n = c.batch_size or 0
        return Conditioning(text=c.text, extras=c.extras, branch=torch.full((n,), flag, dtype=torch.bool))

    return mark(cond, True), mark(uncond, False)


def start_noise_scale(schedule: NoiseSchedule, sigma: Tensor) -> Tensor:
    """The std of the starting sample at ``sigma`` for unit-variance noise: ``sqrt(1 + sigma^2)``
    on variance-preserving schedules, ``sigma`` on EDM (see
    :func:`~t2i_engine.diffusion.grids.is_variance_preserving`)."""
    return (1 + sigma**2).sqrt() if is_variance_preserving(schedule) else sigma


def seeded_noise(seeds: Sequence[int], shape: tuple[int, int, int], *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit-variance starting noise ``(len(seeds), *shape)``, each image's from its own seed.

    Drawn on the CPU so that a seed gives the same image on any device and in any batch.
    """
    return torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(int(s)))
                      for s in seeds]).to(dtype)


def sampling_plan_for(sampler: Sampler, schedule: NoiseSchedule, *, steps: int | None = None,
                      sigmas: Tensor | None = None) -> SamplingPlan:
    """How ``sampler`` runs on ``schedule``: a registered sampler's own :meth:`plan` (its grid,
    the network timing, start and end; ``sigmas`` replace its sigmas), else ``sigmas`` or
    ``steps`` of the schedule's spacing."""
    own = getattr(sampler, "plan", None)
    if callable(own) and steps is None:
        plan = own(schedule)
        if sigmas is None:
            return plan
        sigmas = sigmas.to("cpu", torch.float64)
        same = sigmas.shape == plan.sigmas.shape and bool((sigmas == plan.sigmas).all())
        return attrs.evolve(plan, sigmas=sigmas, options=plan.options if same else {})  # options fit its grid
    if steps is None and sigmas is None:
        raise TypeError("a bare sampler function needs steps= (or pass sigmas=)")
    return default_plan(schedule, steps, sigmas=sigmas)


def sampling_sigmas_for(sampler: Sampler, schedule: NoiseSchedule, *, steps: int | None = None,
                        device: torch.device | None = None) -> Tensor:
    """The sigmas ``sampler`` walks (:func:`sampling_plan_for`), float64 (float32 on MPS, which has no float64)."""
    sigmas = sampling_plan_for(sampler, schedule, steps=steps).sigmas
    if device is not None and torch.device(device).type == "mps":
        return sigmas.float().to(device)
    return sigmas.to(device)


def denoise(sampler: Sampler, plan: Any, denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
            generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """Run ``sampler`` from ``x`` down ``sigmas`` (the plan's, or the tail img2img runs) with the
    plan's ``clip_sample``, options and final scaling: the latents a sampling run ends with.

    The one place that turns a :func:`sampling_plan_for` plan and a guided denoiser into
    latents; :func:`generate` and model plugins with their own guidance (InstructPix2Pix, the
    Imagen cascade) call it. The loop runs inside
    :func:`~t2i_engine.nn.attention.reuse_context_kv`: the text context, the same tensor at every
    step, is projected to cross-attention keys and values once by the core's attention layers
    (the SD family's UNets and ControlNets; Imagen's own attention blocks do not cache).
    """
    if plan.clip_x0 is not None:  # the scheduler config's clip_sample
        denoiser = StaticClip(denoiser, max_value=plan.clip_x0)
    options = dict(plan.options)
    if "targets" in options:  # one per step but the last, of the steps run
        options["targets"] = options["targets"][len(options["targets"]) - (len(sigmas) - 2):]
    with reuse_context_kv():
        latents = sampler(denoiser, x, sigmas, generator=generator, callback=callback, **options)
    return latents * plan.final_scale(float(sigmas[-1]))


@torch.no_grad()
def generate(model: LatentDiffusionModel, prompts: Sequence[str], noise: Tensor, *, sampler: Sampler,
             sigmas: Tensor | None = None, guidance: GuidanceConfig | None = None,
             negative_prompts: Sequence[str] | None = None, init_images: Tensor | None = None,
             strength: float = 0.8, generator: torch.Generator | None = None,
             callback: StepCallback | None = None, conditioners: ConditionerChain | None = None) -> Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1] for ``prompts``.

    Args:
        model: the bundle (text encoder, autoencoder, denoiser network, schedule).
        prompts: one prompt per image (a list of str).
        noise: ``(B, C, h, w)`` unit-variance starting noise; its size sets the image size.
        sampler: any sampler; a registered one supplies its own plan (grid, network timing, start
            and end: :func:`sampling_plan_for`).
        sigmas: the sigma sequence, overriding the sampler's (``steps + 1`` decreasing values).
        guidance: CFG scale, rescale, thresholding (default ``GuidanceConfig()``: scale 7.5).
        negative_prompts: what guidance steers away from; default ``""`` (unconditional).
        init_images: ``(B, 3, H, W)`` in [-1, 1] for img2img; the same ``noise`` noises them.
        strength: img2img, fraction of the steps run, in (0, 1].
        generator: randomness of stochastic samplers and of the img2img posterior sample.
        callback: called after each sampler step (see :data:`~t2i_engine.interfaces.StepCallback`).
        conditioners: the run's ``[[conditioners]]``
            (:func:`~t2i_engine.conditioning.build_conditioners`): each one's ``condition()`` runs
            once for both guidance branches, and the network is called through the chain
            (:class:`~t2i_engine.conditioning.ConditionedNet`) with the step window counted.
    """
    prompts = check_prompts(prompts)
    if noise.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {noise.shape[0]} noise tensors")
    device = next(model.denoiser.parameters()).device
    if device.type == "cpu":
        retain_freed_memory()  # else glibc page-faults every freed activation / weight cast back in
    noise = noise.to(device)
    cond, uncond = encode_prompts(model.text_encoder, prompts, negative_prompts)
    cond, uncond = mark_branches(cond, uncond)
    net: Any = model.denoiser
    if conditioners is not None:
        f = model.autoencoder.downsample_factor
        negative = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        cond, uncond = conditioners.condition(cond, uncond, prompts=prompts, negative_prompts=negative,
                                              height=noise.shape[-2] * f, width=noise.shape[-1] * f,
                                              device=device, dtype=noise.dtype)
        net = conditioners.compose(model.denoiser)
    plan = sampling_plan_for(sampler, model.schedule, sigmas=sigmas)
    sigmas = plan.sigmas  # float64 on the CPU whatever the model's precision: samplers read floats
    denoiser = guided_denoiser(DenoiserWrapper(net, plan.schedule, round_t=plan.round_t),
                               guidance or GuidanceConfig(), cond=cond, uncond=uncond)
    if init_images is None:
        x = noise * plan.start_std(float(sigmas[0]))
    else:
        latents = model.autoencoder.encode(init_images.to(device, noise.dtype), generator=generator)
        sigmas, x = img2img_start(latents, sigmas, strength=strength, noise=noise)
    if conditioners is not None:  # the composed net reads the step from this clock (start/end windows)
        callback = conditioners.clocked(callback, total=len(sigmas) - 1)
    try:
        latents = denoise(sampler, plan, denoiser, x, sigmas, generator=generator, callback=callback)
    finally:
        if conditioners is not None:
            conditioners.clock.stop()
    if device.type == "cpu":
        release_free_memory()  # the loop's free blocks: the decoder's larger activations refill pages
    images = model.autoencoder.decode(latents).clamp_(-1, 1)
    if device.type == "cpu":
        release_free_memory()
    return images
