"""A procedural dataset of coloured shapes: "a red circle on a blue background".

Every sample is a pure function of ``(seed, split, index)``: a shape (circle, square, triangle;
or one of :data:`EXTRA_SHAPES` when the ``shapes`` key names it) of one colour, at a random position and size, on a background of another colour. The
``(colour, shape, background)`` combinations can be split so that a held-out set of captions
never appears in training (an evaluation then prompts with unseen combinations). Each sample
carries its ground-truth labels for pixel-classifier evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch
from attrs.validators import ge, in_, le
from torch import Tensor
from torch.utils.data import Dataset

from t2i_engine.config.fields import option
from t2i_engine.config.limits import image_side, seed_value

__all__ = ["ALL_SHAPES", "COLOURS", "EXTRA_SHAPES", "SHAPES", "ShapesDataset", "placement", "render_shape", "shape_bounds",
           "shape_mask"]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "purple": (0.6, 0.0, 0.8), "orange": (1.0, 0.55, 0.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "cyan": (0.0, 1.0, 1.0),
    "pink": (1.0, 0.5, 0.75),
}
"""Colour names and RGB values in [0, 1]."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""The shapes of the dataset by default (what the shipped shapes-64 model was trained on)."""

EXTRA_SHAPES: tuple[str, ...] = ("plus", "star")
"""Shapes a ``shapes`` list may name beside :data:`SHAPES`; never in the default dataset, so a
model trained on it has not seen them. ``plus``: a Greek cross, arms as wide as they are long
(the DreamBooth demo teaches it); ``star``: a regular five-pointed star, one point up (its points
need a radius of about 8 pixels or more to be told from a triangle)."""

ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES

_STAR_INNER = math.sin(math.radians(18)) / math.sin(math.radians(54))
"""Inner to outer radius of a regular five-pointed star (a pentagram's outline), about 0.382."""


def _star_vertices(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """The 10 corners of a five-pointed star, one point straight up, outer radius ``radius``."""
    out = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * _STAR_INNER
        angle = math.pi / 5 * k  # from "up", clockwise (y grows downwards)
        out.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
    return out


def _inside_polygon(xs: Tensor, ys: Tensor, vertices: list[tuple[float, float]]) -> Tensor:
    """Even-odd rule: a point is inside when a ray to its right crosses the outline an odd
    number of times (works for the star's non-convex outline)."""
    inside = torch.zeros(xs.shape, dtype=torch.bool)
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        if y0 == y1:
            continue  # a horizontal edge is never crossed by a horizontal ray
        straddles = (ys >= min(y0, y1)) & (ys < max(y0, y1))
        x_cross = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= straddles & (xs < x_cross)
    return inside


def shape_bounds(shape: str) -> tuple[float, float, float, float]:
    """The bounding box ``(left, top, right, bottom)`` of a shape of radius 1 centred at 0
    (y down): what :mod:`~t2i_engine.data.shapes_eval` fits into a region's bounding box."""
    if shape in SHAPES or shape == "plus":
        return (-1.0, -1.0, 1.0, 1.0)
    if shape == "star":
        xs, ys = zip(*_star_vertices(0.0, 0.0, 1.0))
        return (min(xs), min(ys), max(xs), max(ys))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")


def shape_mask(shape: str, *, size: int, cx: float, cy: float, radius: float) -> Tensor:
    """Where one shape covers a ``size x size`` image: a ``(size, size)`` bool mask; centre and
    radius in pixels, pixel centres at half-integers."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return (dx.abs() <= radius) & (dy.abs() <= radius)
    if shape == "triangle":  # apex up, base at cy + radius, half-width radius at the base
        t = (dy + radius) / (2 * radius)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (dx.abs() <= t * radius)
    if shape == "plus":  # a Greek cross: arms of width 2/3 radius reaching `radius` from the centre
        arm = radius / 3
        return ((dx.abs() <= arm) & (dy.abs() <= radius)) | ((dy.abs() <= arm) & (dx.abs() <= radius))
    if shape == "star":  # five points, one straight up; outer radius `radius`
        return _inside_polygon(xs, ys, _star_vertices(cx, cy, radius))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")


def render_shape(shape: str, fg: tuple[float, float, float], bg: tuple[float, float, float], *,
                 size: int, cx: float, cy: float, radius: float) -> Tensor:
    """Rasterise one shape: ``(3, size, size)`` in [-1, 1]; centre and radius in pixels."""
    mask = shape_mask(shape, size=size, cx=cx, cy=cy, radius=radius)
    img = torch.tensor(bg).view(3, 1, 1).expand(3, size, size).clone()
    img[:, mask] = torch.tensor(fg).view(3, 1)
    return img * 2 - 1  # (3, size, size) in [-1, 1]


def _default_colours() -> list[str]:
    return ["red", "green", "blue", "yellow", "purple", "white"]


def _known(values: tuple[str, ...]) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute, value: list[str]) -> None:
        bad = [v for v in value if v not in values]
        if bad or len(set(value)) != len(value) or not value:
            raise ValueError(f"{attribute.name}: unknown or repeated {bad or value}; "
                             f"known: {', '.join(values)}")
    return check


@attrs.frozen(kw_only=True)
class ShapesConfig:
    """Keys of ``[data]`` with ``type = "shapes"``."""

    size: int = option(default=32, validator=image_side, help="image side in pixels")
    count: int = option(default=10000, validator=ge(1), help="samples in the split")
    seed: int = option(default=0, validator=seed_value, help="seed of the whole dataset")
    colours: list[str] = option(factory=_default_colours, validator=_known(tuple(COLOURS)),
                                help="colour names used for shapes and backgrounds")
    shapes: list[str] = option(factory=lambda: list(SHAPES), validator=_known(ALL_SHAPES),
                               help="shape names used (default circle, square, triangle; also: plus, star)")
    split: Literal["all", "train", "heldout"] = option(
        default="all", validator=in_(("all", "train", "heldout")),
        help="which combinations: all, the training ones, or the held-out ones")
    heldout_fraction: float = option(default=0.0, validator=[ge(0.0), le(0.9)],
                                     help="fraction of (colour, shape, background) combinations held out")
    min_radius: float = option(default=0.18, validator=[ge(0.05), le(0.5)],
                               help="smallest shape radius, as a fraction of size")
    max_radius: float = option(default=0.35, validator=[ge(0.05), le(0.5)],
                               help="largest shape radius, as a fraction of size")


def placement(config: ShapesConfig, index: int) -> tuple[float, float, float, float]:
    """The draws of sample ``index`` of a shapes split, a pure function of ``(seed, split, index)``:
    ``(pick, cx, cy, radius)``, ``pick`` in [0, 1) choosing the sample's labels, and a centre and
    radius (pixels) that keep the shape inside the image. Datasets built on the shapes (edit
    triplets, hints) use it so that their index ``i`` places the shape as :class:`ShapesDataset` does."""
    split_id = ("all", "train", "heldout").index(config.split)
    # modulo 2**64: large seeds wrap instead of overflowing manual_seed (small ones are unchanged)
    g = torch.Generator().manual_seed(((config.seed * 1_000_003 + split_id) * 10_000_019 + index) % 2**64)
    u = torch.rand(4, generator=g).tolist()
    size = config.size
    radius = size * (config.min_radius + (config.max_radius - config.min_radius) * u[1])
    return u[0], radius + (size - 2 * radius) * u[2], radius + (size - 2 * radius) * u[3], radius


class ShapesDataset(Dataset):
    """Map-style dataset of shape images; see the module docstring.

    A sample is ``{"image": (3, S, S) in [-1, 1], "caption": str, "index": int,
    "colour_label": int, "shape_label": int, "background_label": int}``; labels index
    :attr:`colours` and :attr:`shapes`. ``cx``, ``cy`` and ``radius`` (pixels) place the
    shape, so that :func:`shape_mask` gives where it is (a ControlNet hint, an edit's target).
    """

    Config = ShapesConfig

    def __init__(self, config: ShapesConfig | None = None, **overrides: Any) -> None:
        self.config = config = attrs.evolve(config or ShapesConfig(), **overrides)
        self.colours = list(config.colours)
        self.shapes = list(config.shapes)
        combos = [(c, s, b) for c in range(len(self.colours)) for s in range(len(self.shapes))
                  for b in range(len(self.colours)) if b != c]
        if not combos:
            raise ValueError("shapes dataset needs at least two colours")
        order = torch.randperm(len(combos), generator=torch.Generator().manual_seed(config.seed)).tolist()
        n_held = round(config.heldout_fraction * len(combos))
        held = sorted(order[:n_held])
        train = sorted(order[n_held:])
        chosen = {"all": range(len(combos)), "train": train, "heldout": held}[config.split]
        self.combinations: list[tuple[int, int, int]] = [combos[i] for i in chosen]
        self.heldout_captions = sorted(self.caption_of(*combos[i]) for i in held)
        if not self.combinations:
            raise ValueError(f"split {config.split!r} is empty (heldout_fraction="
                             f"{config.heldout_fraction})")

    def caption_of(self, colour: int, shape: int, background: int, *, words: Mapping[str, str] | None = None) -> str:
        """The caption of a label triple; ``words`` spells shapes otherwise (``{"plus": "sks"}``:
        a DreamBooth identifier in place of the shape's name)."""
        name = self.shapes[shape]
        return f"a {self.colours[colour]} {(words or {}).get(name, name)} on a {self.colours[background]} background"

    def __len__(self) -> int:
        return self.config.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        cfg = self.config
        pick, cx, cy, radius = placement(cfg, index)
        c, s, b = self.combinations[int(pick * len(self.combinations)) % len(self.combinations)]
        image = render_shape(self.shapes[s], COLOURS[self.colours[c]], COLOURS[self.colours[b]],
                             size=cfg.size, cx=cx, cy=cy, radius=radius)
        return {"image": image, "caption": self.caption_of(c, s, b), "index": index,
                "colour_label": c, "shape_label": s, "background_label": b,
                "cx": cx, "cy": cy, "radius": radius}
