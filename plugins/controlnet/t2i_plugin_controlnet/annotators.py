"""Annotators: hint makers that turn the entry's image into the hint the network was trained on.

A registry of ``name -> factory`` (:data:`ANNOTATORS`, extended with :func:`register_annotator`),
like the core's samplers and schedules: a factory takes the ``[[conditioners]]`` entry's config
(its annotator keys) and returns a callable ``(image, inputs) -> hint`` on ``(B, 3, H, W)`` in
[0, 1]. Built in:

* ``none``: the image is the hint (an edge map, a depth map ... made elsewhere);
* ``canny``: the Canny edge detector (Canny 1986) of kornia on the grey levels, white edges on black
  in all three channels as the original ``HWC3(cv2.Canny(...))`` gives them;
* ``inpaint``: the image with the pixels under ``inputs.mask`` (white = to repaint) set to -1, the
  hint of the v1.1 inpainting ControlNet (diffusers' ``make_inpaint_condition``);
* ``depth_midas``: MiDaS v3 DPT-Hybrid relative depth (:mod:`t2i_plugin_controlnet.midas`), from the
  user's ``dpt_hybrid-midas-501f0c75.pt`` (``midas_weights``; nothing is downloaded), scaled to
  [0, 1] per image as lllyasviel's ``MidasDetector`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from torch import Tensor

from t2i_sdk import ConfigError

__all__ = ["ANNOTATORS", "Annotator", "annotate", "build_annotator", "register_annotator"]

MASK_INPUT = "mask"
"""The name of the inpaint mask in the entry's ``inputs`` table."""


class Annotator(Protocol):
    """``image`` ``(B, 3, H, W)`` in [0, 1] (and the entry's other inputs, loaded in [-1, 1]) -> the hint."""

    def __call__(self, image: Tensor, *, inputs: Mapping[str, Tensor]) -> Tensor: ...


ANNOTATORS: dict[str, Callable[[Any], Annotator]] = {}
"""``name -> factory(config) -> Annotator``; ``config`` is the entry's ``ControlNetConditionerConfig``."""


def register_annotator(name: str) -> Callable[[Callable[[Any], Annotator]], Callable[[Any], Annotator]]:
    """Decorator: register an annotator factory under ``name`` (a name taken twice is an error)."""
    def add(factory: Callable[[Any], Annotator]) -> Callable[[Any], Annotator]:
        if name in ANNOTATORS:
            raise ValueError(f"annotator {name!r} is registered twice")
        ANNOTATORS[name] = factory
        return factory
    return add


def build_annotator(config: Any) -> Annotator:
    """The annotator ``config.annotator`` names, built from the entry's keys."""
    factory = ANNOTATORS.get(config.annotator)
    if factory is None:
        raise ConfigError(f"controlnet: unknown annotator {config.annotator!r}; one of {', '.join(ANNOTATORS)}")
    return factory(config)


def canny(image: Tensor, *, low: float, high: float) -> Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> its Canny edges ``(B, 3, H, W)`` in {0, 1}; ``low``/``high``
    are the hysteresis thresholds on the gradient magnitude of the [0, 1] grey image (kornia's units,
    not OpenCV's 0-255 ones)."""
    try:
        import kornia
    except ImportError as exc:
        raise ConfigError("controlnet: annotator = \"canny\" needs kornia: pip install "
                          "'t2i-plugin-controlnet[canny]'") from exc
    grey = kornia.color.rgb_to_grayscale(image.float())
    _, edges = kornia.filters.canny(grey, low_threshold=low, high_threshold=high)
    return edges.to(image.dtype).expand(-1, 3, -1, -1)


def inpaint_hint(image: Tensor, mask: Tensor) -> Tensor:
    """``image`` ``(B, 3, H, W)`` in [0, 1] with the pixels where ``mask`` (``(B, C, H, W)`` in
    [-1, 1], white = repaint, channels averaged) is above its middle set to -1."""
    masked = (mask.float().mean(1, keepdim=True) > 0).expand_as(image)
    return image.masked_fill(masked, -1.0)


@register_annotator("none")
def _none(_config: Any) -> Annotator:
    return lambda image, *, inputs: image


@register_annotator("canny")
def _canny(config: Any) -> Annotator:
    return lambda image, *, inputs: canny(image, low=config.canny_low, high=config.canny_high)


@register_annotator("inpaint")
def _inpaint(_config: Any) -> Annotator:
    def run(image: Tensor, *, inputs: Mapping[str, Tensor]) -> Tensor:
        mask = inputs.get(MASK_INPUT)
        if mask is None:
            raise ConfigError(f"controlnet: annotator = \"inpaint\" needs the mask: inputs = {{ image = \"...\", "
                              f"{MASK_INPUT} = \"mask.png\" }} (white = the region to repaint)")
        return inpaint_hint(image, mask)
    return run


@register_annotator("depth_midas")
def _depth_midas(config: Any) -> Annotator:
    from t2i_plugin_controlnet.midas import MIDAS_FILE, load_midas, midas_depth_hint

    if not config.midas_weights:
        raise ConfigError(f"controlnet: annotator = \"depth_midas\" needs the MiDaS v3 DPT-Hybrid weights: set "
                          f"midas_weights = \"path/to/{MIDAS_FILE}\" (nothing is downloaded)")
    net = load_midas(config.midas_weights)
    return lambda image, *, inputs: midas_depth_hint(net, image)


def annotate(image: Tensor, name: str, *, canny_low: float = 0.1, canny_high: float = 0.2) -> Tensor:
    """The hint that the weight-free annotator ``name`` makes of ``image`` ``(B, 3, H, W)`` in [0, 1]."""
    import types

    config = types.SimpleNamespace(annotator=name, canny_low=canny_low, canny_high=canny_high, midas_weights=None)
    return build_annotator(config)(image, inputs={})
