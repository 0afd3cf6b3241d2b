"""The InstructPix2Pix edit path: a source image and an instruction through an 8-channel SD UNet.

The UNet's input is ``cat([noisy latent, source latent])`` (noisy latent first, the core UNet's
``cond.extras["concat"]``). The source latent is the VAE posterior's MODE, not multiplied by the
scaling factor (the reference ``encode_first_stage(img).mode()``; diffusers ``sample_mode="argmax"``).
Guidance is the core's :class:`~t2i_engine.diffusion.guidance.DualCFGDenoiser` on the batch
``[(text, image), ("", image), ("", zeros)]``:
``uncond + s_T (cond - img_cond) + s_I (img_cond - uncond)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from t2i_engine.conditioning.inputs import load_image
from t2i_engine.diffusion.guidance import DualCFGDenoiser
from t2i_engine.diffusion.parameterization import DenoiserWrapper
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import Conditioning, Sampler, StepCallback
from t2i_engine.pipeline import denoise, encode_prompts, sampling_plan_for

__all__ = ["EDIT_CHANNELS", "check_edit_model", "edit_images", "guidance_applies", "load_source", "source_latents"]

EDIT_CHANNELS = 8  # 4 noisy latent + 4 source latent
_INPAINT_CHANNELS = 9  # SD inpainting: 4 noisy + 1 mask + 4 masked image


def guidance_applies(text_scale: float, image_scale: float) -> bool:
    """diffusers' gate (``StableDiffusionInstructPix2PixPipeline.do_classifier_free_guidance``):
    guidance runs only when ``text_scale > 1 and image_scale >= 1``; otherwise the network is
    called once on (text, image) and its output used as is. Kept for parity with diffusers; the
    reference ``edit_cli.py`` has no such gate."""
    return text_scale > 1.0 and image_scale >= 1.0


def check_edit_model(model: object) -> None:
    """A ValueError unless ``model``'s UNet takes 8 input channels (SD inpainting's 9 named) and
    its checkpoint carries no EMA copy (``model_ema.*``) that the reference would edit with."""
    ema = sorted(k for k in getattr(model, "extras", {}) if k.startswith("model_ema."))
    if ema:
        # the SD loader takes model.diffusion_model.* (the non-EMA weights) and keeps model_ema.*
        # aside; the reference (edit_cli.py, load_ema) edits with the EMA ones: make the caller choose
        raise ValueError(f"the checkpoint carries EMA weights ({ema[0]}, ... {len(ema)} keys, as timbrooks' "
                         "instruct-pix2pix-00-22000.ckpt does), which the reference edits with; this plugin "
                         "has not been told which to use: call t2i_plugin_instructpix2pix.ema.choose_weights(model, "
                         "ema=True) (the reference's) or ema=False (the trained weights)")
    config = getattr(getattr(model, "denoiser", None), "config", None)
    channels = getattr(config, "in_channels", None)
    if channels == EDIT_CHANNELS:
        return
    if channels == _INPAINT_CHANNELS:
        raise ValueError("InstructPix2Pix needs a UNet with 8 input channels; this one has 9, the layout of "
                         "Stable Diffusion inpainting (noisy latent, mask, masked image), not an edit model")
    raise ValueError(f"InstructPix2Pix needs a UNet with 8 input channels (noisy latent + source latent); "
                     f"this one has {channels}")


def load_source(url: str, *, factor: int, key: str = "source") -> Tensor:
    """``(1, 3, H, W)`` in [-1, 1] from a path or fsspec URL at its own size, floored to multiples
    of ``factor`` (diffusers' image processor does the same with the VAE's factor)."""
    import fsspec
    from PIL import Image

    try:
        with fsspec.open(url, "rb") as f:
            width, height = Image.open(f).size
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: '{url}' is not a readable image ({type(exc).__name__})") from exc
    width, height = width // factor * factor, height // factor * factor
    if not width or not height:
        raise ConfigError(f"{key}: '{url}' is smaller than {factor} pixels on a side")
    return load_image(url, width=width, height=height, key=key)


def source_latents(autoencoder: object, images: Tensor) -> Tensor:
    """The posterior mode of ``images`` ``(B, 3, H, W)`` in [-1, 1], unscaled (the SD plugin's
    autoencoder ``moments``)."""
    moments = getattr(autoencoder, "moments", None)
    if not callable(moments):
        raise TypeError(f"{type(autoencoder).__name__} has no moments(): InstructPix2Pix needs the "
                        "posterior mode of a Stable Diffusion autoencoder")
    return moments(images)[0]


@torch.no_grad()
def edit_images(model: object, prompts: Sequence[str], sources: Tensor, noise: Tensor, *, sampler: Sampler,
                sigmas: Tensor | None = None, text_scale: float = 7.5, image_scale: float = 1.5,
                negative_prompts: Sequence[str] | None = None, generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> Tensor:
    """Edited images ``(B, 3, H, W)`` in [-1, 1], one per instruction in ``prompts``.

    Args:
        model: an SD bundle (:func:`t2i_plugin_sd.model.build_model`) with an 8-channel UNet.
        prompts: one instruction per image.
        sources: ``(B, 3, H, W)`` in [-1, 1]; the output has their size.
        noise: ``(B, 4, H/f, W/f)`` unit-variance starting noise.
        sampler: any sampler (its own plan, as in :func:`t2i_engine.pipeline.generate`).
        sigmas: overrides the sampler's sigmas.
        text_scale: s_T (diffusers ``guidance_scale``), default 7.5.
        image_scale: s_I (diffusers ``image_guidance_scale``), default 1.5.
        negative_prompts: the text of the two text-free branches; default ``""``.
        generator: randomness of stochastic samplers.
        callback: called after each sampler step.
    """
    check_edit_model(model)
    n = len(prompts)
    if sources.shape[0] != n or noise.shape[0] != n:
        raise ValueError(f"{n} prompts, {sources.shape[0]} source images and {noise.shape[0]} noise tensors")
    ae, net = model.autoencoder, model.denoiser  # type: ignore[attr-defined]
    f = ae.downsample_factor
    if tuple(noise.shape[-2:]) != (sources.shape[-2] // f, sources.shape[-1] // f):
        raise ValueError(f"noise {tuple(noise.shape)} does not fit source images {tuple(sources.shape)} "
                         f"(autoencoder factor {f})")
    device = next(net.parameters()).device
    noise = noise.to(device)
    image = source_latents(ae, sources.to(device, noise.dtype))
    cond, uncond = encode_prompts(model.text_encoder, prompts, negative_prompts)  # type: ignore[attr-defined]
    plan = sampling_plan_for(sampler, model.schedule, sigmas=sigmas)  # type: ignore[attr-defined]
    inner = DenoiserWrapper(net, plan.schedule, round_t=plan.round_t)
    full = Conditioning(text=cond.text, extras={"concat": image})
    if guidance_applies(text_scale, image_scale):
        image_only = Conditioning(text=uncond.text, extras={"concat": image})
        zeros = Conditioning(text=uncond.text, extras={"concat": torch.zeros_like(image)})
        denoiser = DualCFGDenoiser(inner, full, image_only, zeros, text_scale=text_scale, image_scale=image_scale)
    else:
        denoiser = inner.bind(full)
    x = noise * plan.start_std(float(plan.sigmas[0]))
    latents = denoise(sampler, plan, denoiser, x, plan.sigmas, generator=generator, callback=callback)
    return ae.decode(latents).clamp_(-1, 1)
