"""A deterministic pixel classifier for shape images: what a generated image shows.

It reads an image of the :mod:`t2i_engine.data.shapes` kind (one shape on a flat background)
back into labels, with no learned parts, so that a text-to-image model's prompt adherence can be
scored exactly:

* background colour: the palette colour most of the image border is nearest to;
* shape mask: the largest connected region of pixels nearest to another palette colour;
* shape colour: the palette colour most of the mask's pixels are nearest to;
* shape class: the ideal shape (rendered by :func:`~t2i_engine.data.shapes.render_shape` so that
  its own bounding box, :func:`~t2i_engine.data.shapes.shape_bounds`, fills the mask's) that
  overlaps the mask best (intersection over union). The candidates are the ``shapes`` given:
  the dataset's three, or with :data:`~t2i_engine.data.shapes.EXTRA_SHAPES` such as the star.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import torch
from torch import Tensor

from t2i_engine.data.shapes import COLOURS, SHAPES, render_shape, shape_bounds

__all__ = ["ShapeLabels", "accuracy", "classify", "classify_batch", "foreground_mask", "format_table"]


@attrs.frozen
class ShapeLabels:
    """Labels read from one image: indices into the colour and shape lists (-1: nothing found)."""

    colour: int
    shape: int
    background: int


def _palette(colours: Sequence[str]) -> Tensor:
    return torch.tensor([COLOURS[c] for c in colours]) * 2 - 1  # (K, 3) in [-1, 1]


def _components(mask: Tensor) -> Tensor:
    """4-connected component labels of a boolean ``(H, W)`` mask (0 outside it): each pixel
    takes the largest pixel number in its component, by repeated neighbour maxima."""
    labels = torch.where(mask, torch.arange(1, mask.numel() + 1).view(mask.shape), 0)
    while True:
        p = torch.nn.functional.pad(labels, (1, 1, 1, 1))
        spread = torch.stack([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]).amax(0)
        spread = torch.where(mask, spread, 0)
        if torch.equal(spread, labels):
            return labels
        labels = spread


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (ties: the one met first in raster order,
    as ``scipy.ndimage.label`` numbers them)."""
    m = torch.from_numpy(mask)
    labels = _components(m)
    ids, inverse, sizes = labels[m].unique(return_inverse=True, return_counts=True)
    if len(ids) <= 1:
        return mask
    first = torch.full((len(ids),), m.numel()).scatter_reduce(0, inverse, m.flatten().nonzero()[:, 0], "amin")
    best = max(range(len(ids)), key=lambda i: (int(sizes[i]), -int(first[i])))
    return (labels == ids[best]).numpy()


def _shape_of(mask: np.ndarray, shapes: Sequence[str]) -> int:
    """The shape whose ideal render in the mask's bounding box has the highest IoU with it."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return -1
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    ious = []
    for name in shapes:
        left, top, right, bottom = shape_bounds(name)  # radius 1, centred at 0
        radius = ((x1 - x0) / (right - left) + (y1 - y0) / (bottom - top)) / 2
        cx = (x0 + x1) / 2 - (left + right) / 2 * radius
        cy = (y0 + y1) / 2 - (top + bottom) / 2 * radius
        ideal = render_shape(name, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), size=max(mask.shape), cx=float(cx),
                             cy=float(cy), radius=float(radius))[0].numpy() > 0  # (S, S) bool
        ideal = ideal[: mask.shape[0], : mask.shape[1]]
        ious.append((ideal & mask).sum() / max(int((ideal | mask).sum()), 1))
    return int(np.argmax(ious))


def _read(image: Tensor, colours: Sequence[str]) -> tuple[Tensor, int, np.ndarray]:
    """``(nearest palette index per pixel (H, W), background index, shape mask (H, W) bool)``."""
    palette = _palette(colours)  # (K, 3)
    pixels = image.detach().float().cpu().permute(1, 2, 0)  # (H, W, 3)
    nearest = torch.cdist(pixels.reshape(-1, 3), palette).argmin(dim=1).reshape(pixels.shape[:2])  # (H, W)
    border = torch.cat([nearest[0], nearest[-1], nearest[1:-1, 0], nearest[1:-1, -1]])
    background = int(torch.bincount(border, minlength=len(colours)).argmax())
    return nearest, background, _largest_component((nearest != background).numpy())


def foreground_mask(image: Tensor, *, colours: Sequence[str]) -> np.ndarray:
    """Where :func:`classify` finds the shape in ``image`` ``(3, H, W)`` in [-1, 1]: the largest
    connected region of pixels not of the background's palette colour, ``(H, W)`` bool (all
    False when there is none); to compare with where it should be (intersection over union)."""
    return _read(image, colours)[2]


def classify(image: Tensor, *, colours: Sequence[str], shapes: Sequence[str] = SHAPES) -> ShapeLabels:
    """Read ``(colour, shape, background)`` from one image ``(3, H, W)`` in [-1, 1].

    ``colours`` and ``shapes`` are the dataset's lists (``ShapesDataset.colours``/``.shapes``);
    the returned indices point into them, as the dataset's ``*_label`` fields do.
    """
    nearest, background, mask = _read(image, colours)
    if not mask.any():
        return ShapeLabels(-1, -1, background)
    colour = int(torch.bincount(nearest[torch.from_numpy(mask)], minlength=len(colours)).argmax())
    return ShapeLabels(colour, _shape_of(mask, shapes), background)


def classify_batch(images: Tensor, *, colours: Sequence[str], shapes: Sequence[str] = SHAPES) -> list[ShapeLabels]:
    """:func:`classify` over ``(B, 3, H, W)``."""
    return [classify(img, colours=colours, shapes=shapes) for img in images]


def accuracy(predicted: Sequence[ShapeLabels], truth: Sequence[ShapeLabels]) -> dict[str, float]:
    """Fractions correct: ``colour``, ``background``, ``shape`` and ``all`` (the three at once)."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} labels")
    n = len(truth)
    hits = {"colour": 0, "background": 0, "shape": 0, "all": 0}
    for p, t in zip(predicted, truth):
        ok = {"colour": p.colour == t.colour, "background": p.background == t.background, "shape": p.shape == t.shape}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
    return {k: v / n for k, v in hits.items()}


def format_table(scores: dict[str, float], *, count: int, targets: dict[str, float] | None = None) -> str:
    """A plain-text table of accuracies (and targets, when given) for ``count`` images."""
    targets = targets or {}
    lines = [f"{'metric':<12}{'accuracy':>10}{'target':>10}", "-" * 32]
    for k, v in scores.items():
        t = f"{targets[k]:.0%}" if k in targets else ""
        lines.append(f"{k:<12}{v:>10.1%}{t:>10}")
    lines.append(f"({count} images)")
    return "\n".join(lines)
