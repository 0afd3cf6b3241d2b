"""Annotators: hint makers that turn the entry's image into the hint the network was trained on.

``none`` passes the image through (it already is the hint: an edge map, a depth map ...);
``canny`` is the Canny edge detector (Canny 1986) of kornia, on the image's grey levels, white
edges on black in all three channels as the original ``HWC3(cv2.Canny(...))`` gives them.
Annotators that need weights (MiDaS depth, HED, OpenPose ...) are not here yet.
"""

from __future__ import annotations

from torch import Tensor

from t2i_sdk import ConfigError

__all__ = ["ANNOTATORS", "annotate"]

ANNOTATORS = ("none", "canny")


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


def annotate(image: Tensor, name: str, *, canny_low: float, canny_high: float) -> Tensor:
    """The hint that annotator ``name`` makes of ``image`` ``(B, 3, H, W)`` in [0, 1]."""
    if name == "none":
        return image
    if name == "canny":
        return canny(image, low=canny_low, high=canny_high)
    raise ConfigError(f"controlnet: unknown annotator {name!r}; one of {', '.join(ANNOTATORS)}")
