"""Guidance as denoiser wrappers: each turns ``D(x, sigma, cond)`` into ``model(x, sigma)``.

* :class:`CFGDenoiser` - classifier-free guidance (Ho & Salimans 2022), cond and uncond in one
  batched forward, with optional guidance rescale (Lin et al. 2023, eq. 15-16) and an optional
  guidance interval (Kynkaanniemi et al. 2024: guidance only for sigma in ``(lo, hi]``, the
  conditional prediction alone elsewhere).
* :class:`DualCFGDenoiser` - InstructPix2Pix's dual guidance (Brooks et al. 2023, eq. 3):
  uncond, image-only and image+text in one forward, separate image and text scales.
* :class:`DynamicThreshold` / :class:`StaticClip` - Imagen's dynamic thresholding (Saharia et al.
  2022, percentile ``p``) and static clipping of the x0 estimate, wrapping any ``model(x, sigma)``.

:class:`GuidanceConfig` holds the config keys and :func:`guided_denoiser` builds the chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from t2i_engine.diffusion.parameterization import from_x0, to_x0
from t2i_engine.interfaces import Conditioning, Denoiser

CondDenoiser = Callable[[Tensor, Tensor, Conditioning], Tensor]
"""``D(x, sigma, cond) -> x0`` (e.g. :class:`~t2i_engine.diffusion.parameterization.DenoiserWrapper`)."""


def _output_kind(model: object) -> dict[str, Any]:
    """``prediction`` and ``sigma_data`` of the network under a wrapper (eps when it does not say),
    passed along so that samplers and guidance rescale can work on the raw network output."""
    return {"prediction": getattr(model, "prediction", "eps"), "sigma_data": float(getattr(model, "sigma_data", 0.5))}


def _as_batch(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def in_interval(sigma: Tensor, interval: tuple[float, float] | None) -> Tensor | None:
    """Per sample, whether ``sigma`` lies in the guidance interval ``(lo, hi]``; None when there is
    no interval (guidance at every sigma)."""
    if interval is None:
        return None
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)


def rescale_guidance(eps_cfg: Tensor, eps_cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023 (eq. 15-16): match the per-sample std of the guided prediction to the
    conditional one and blend ``phi`` of it with the plain guided prediction."""
    dims = list(range(1, eps_cfg.ndim))
    factor = eps_cond.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True)
    return phi * (eps_cfg * factor) + (1 - phi) * eps_cfg


class CFGDenoiser:
    """Classifier-free guidance: ``D_u + scale * (D_c - D_u)`` from one forward of batch ``2B``.

    ``rescale > 0`` applies guidance rescale to the network's raw output (eps, or v for a
    v-prediction network: ``inner.prediction``), as diffusers' ``guidance_rescale`` does.
    ``scale == 1`` skips the uncond branch. ``interval = (lo, hi)`` guides only the samples whose
    sigma is in ``(lo, hi]``; the others get ``D_c``, and a step with none inside runs the cond
    branch alone.
    """

    def __init__(self, inner: CondDenoiser, cond: Conditioning, uncond: Conditioning, *,
                 scale: float, rescale: float = 0.0, interval: tuple[float, float] | None = None) -> None:
        self.inner, self.scale, self.rescale, self.interval = inner, scale, rescale, interval
        self.prediction, self.sigma_data = _output_kind(inner).values()
        self.cond = cond
        self.both = Conditioning.cat([uncond, cond]) if scale != 1 else cond

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``x`` ``(B, ...)``, ``sigma`` ``(B,)`` -> guided x0 ``(B, ...)``."""
        sigma = _as_batch(sigma, x)
        inside = in_interval(sigma, self.interval)
        if self.scale == 1 or (inside is not None and not bool(inside.any())):
            return self.inner(x, sigma, self.cond)
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), self.both)  # (2B, ...)
        d_uncond, d_cond = out.chunk(2)
        guided = d_uncond + self.scale * (d_cond - d_uncond)
        if self.rescale > 0:
            # on the network's own output (eps, v, ...), as diffusers' rescale_noise_cfg is applied
            # to the guided model output; x0 is affine in it, so CFG itself is the same either way
            kw = _output_kind(self.inner)
            out_cfg, out_cond = from_x0(guided, x, sigma, **kw), from_x0(d_cond, x, sigma, **kw)
            guided = to_x0(rescale_guidance(out_cfg, out_cond, self.rescale), x, sigma, **kw)
        if inside is not None:
            guided = torch.where(inside.reshape(-1, *([1] * (x.ndim - 1))), guided, d_cond)
        return guided


class DualCFGDenoiser:
    """InstructPix2Pix guidance from one forward of batch ``3B``:
    ``D_u + image_scale (D_img - D_u) + text_scale (D_full - D_img)``.

    ``full`` carries text and image, ``image_only`` the empty prompt and the image, ``uncond``
    the empty prompt and a zero image.
    """

    def __init__(self, inner: CondDenoiser, full: Conditioning, image_only: Conditioning,
                 uncond: Conditioning, *, text_scale: float, image_scale: float) -> None:
        self.inner, self.text_scale, self.image_scale = inner, text_scale, image_scale
        self.prediction, self.sigma_data = _output_kind(inner).values()
        self.all = Conditioning.cat([full, image_only, uncond])

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``x`` ``(B, ...)``, ``sigma`` ``(B,)`` -> guided x0 ``(B, ...)``."""
        sigma = _as_batch(sigma, x)
        out = self.inner(torch.cat([x, x, x]), torch.cat([sigma, sigma, sigma]), self.all)  # (3B, ...)
        d_full, d_image, d_uncond = out.chunk(3)
        return d_uncond + self.image_scale * (d_image - d_uncond) + self.text_scale * (d_full - d_image)


class DynamicThreshold:
    """Imagen's dynamic thresholding of the x0 estimate (Saharia et al. 2022, section 2.3).

    Per sample, ``s`` is the ``percentile`` quantile of ``|x0|``, floored at ``max_value`` (and
    capped at ``ceiling`` when given: DeepFloyd IF's ``sample_max_value`` 1.5, diffusers'
    ``_threshold_sample``); x0 is clipped to ``[-s, s]`` and divided by ``s`` (then multiplied by
    ``max_value``).
    """

    def __init__(self, model: Denoiser, *, percentile: float = 0.995, max_value: float = 1.0,
                 ceiling: float | None = None) -> None:
        self.model, self.percentile, self.max_value, self.ceiling = model, percentile, max_value, ceiling
        self.prediction, self.sigma_data = _output_kind(model).values()

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        x0 = self.model(x, sigma)
        flat = x0.reshape(x0.shape[0], -1).abs().float()
        s = torch.quantile(flat, self.percentile, dim=1).clamp(min=self.max_value, max=self.ceiling).to(x0.dtype)
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)
        return x0.clamp(-s, s) / s * self.max_value


class StaticClip:
    """Static clipping of the x0 estimate to ``[-max_value, max_value]`` (Ho et al. 2020)."""

    def __init__(self, model: Denoiser, *, max_value: float = 1.0) -> None:
        self.model, self.max_value = model, max_value
        self.prediction, self.sigma_data = _output_kind(model).values()

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.model(x, sigma).clamp(-self.max_value, self.max_value)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def to_float(value: Any) -> Any:
    """attrs converter: ints become floats (TOML ``7`` for ``7.0``); anything else is left for
    the type validator to reject (``"x"``, ``True``)."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _is_float(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, float):
        raise TypeError(f"'{attr.name}' must be a number, got {value!r}")


def float_field(default: float | None, *validators: Any, optional: bool = False) -> Any:
    """A float config field accepting ints, with an instance check and extra validators."""
    check = _is_float
    validator = attrs.validators.optional([check, *validators]) if optional else [check, *validators]
    return attrs.field(default=default, converter=to_float, validator=validator)


@attrs.frozen
class GuidanceConfig:
    """Guidance keys of a sampling config (the ``[sampler]`` table's guidance part)."""

    guidance_scale: float = float_field(7.5, attrs.validators.ge(0.0))  # CFG scale; 1 = off
    guidance_rescale: float = float_field(0.0, attrs.validators.ge(0.0), attrs.validators.le(1.0))  # phi
    image_guidance_scale: float | None = float_field(None, attrs.validators.ge(0.0), optional=True)  # IP2P
    dynamic_threshold: float | None = float_field(  # Imagen percentile p, e.g. 0.995
        None, attrs.validators.gt(0.0), attrs.validators.le(1.0), optional=True)
    dynamic_threshold_max: float | None = float_field(  # cap on the threshold s (DeepFloyd IF: 1.5)
        None, attrs.validators.ge(1.0), optional=True)

    @dynamic_threshold_max.validator
    def _needs_threshold(self, attr: attrs.Attribute, value: float | None) -> None:
        if value is not None and self.dynamic_threshold is None:
            raise ValueError("'dynamic_threshold_max' needs 'dynamic_threshold' (the percentile) to be set")
    clip_denoised: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    guidance_interval: tuple[float, float] | None = attrs.field(  # (lo, hi]: CFG only for sigma inside
        default=None, converter=lambda v: _interval(v) if v is not None else None)


def _interval(value: Any) -> tuple[float, float]:
    """attrs converter of ``guidance_interval``: two sigmas ``[lo, hi]``, ``0 <= lo < hi``."""
    if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"'guidance_interval' must be two sigmas [lo, hi], got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not 0.0 <= lo < hi:
        raise ValueError(f"'guidance_interval' needs 0 <= lo < hi, got [{lo:g}, {hi:g}]")
    return lo, hi


def guided_denoiser(inner: CondDenoiser, config: GuidanceConfig, *, cond: Conditioning,
                    uncond: Conditioning, image_only: Conditioning | None = None) -> Denoiser:
    """Build the sampler-space denoiser for ``config``: CFG (or dual CFG when
    ``image_guidance_scale`` is set, which needs ``image_only``), then thresholding."""
    model: Denoiser
    if config.image_guidance_scale is not None:
        if image_only is None:
            raise ValueError("image_guidance_scale needs the image-only conditioning")
        if config.guidance_interval is not None:
            raise ValueError("guidance_interval is for classifier-free guidance; InstructPix2Pix's dual "
                             "guidance (image_guidance_scale) does not take it")
        model = DualCFGDenoiser(inner, cond, image_only, uncond, text_scale=config.guidance_scale,
                                image_scale=config.image_guidance_scale)
    else:
        model = CFGDenoiser(inner, cond, uncond, scale=config.guidance_scale,
                            rescale=config.guidance_rescale, interval=config.guidance_interval)
    if config.dynamic_threshold is not None:
        model = DynamicThreshold(model, percentile=config.dynamic_threshold, ceiling=config.dynamic_threshold_max)
    elif config.clip_denoised:
        model = StaticClip(model)
    return model


__all__ = [
    "CFGDenoiser", "CondDenoiser", "DualCFGDenoiser", "DynamicThreshold", "GuidanceConfig",
    "StaticClip", "float_field", "guided_denoiser", "in_interval", "rescale_guidance", "to_float",
]
