"""Procedural edit triplets from the shapes generator: the embedded demo's data.

A source is one shape of the :mod:`t2i_engine.data.shapes` kind; an instruction changes one
attribute and the target is the same shape, at the same position and size, with that attribute
changed, rendered by the same generator:

* colour: ``"make the circle green"`` (the shape's colour; never the background's);
* shape: ``"turn the square into a triangle"``;
* background: ``"make the background white"`` (never the shape's colour).

The (source labels, instruction) combinations can be split so that a held-out fraction never
appears in training; an evaluation then edits unseen combinations (every instruction and every
source kind still appears in training, with other partners). Every sample is a pure function of
``(seed, split, index)``.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from attrs.validators import ge, le
from torch.utils.data import Dataset

from t2i_engine.config.fields import option
from t2i_engine.config.limits import image_side
from t2i_engine.data.shapes import COLOURS, SHAPES, ShapesConfig, placement, render_shape

__all__ = ["EDIT_KINDS", "Edit", "ShapesEditDataset"]

EDIT_KINDS: tuple[str, ...] = ("colour", "shape", "background")


@attrs.frozen
class Edit:
    """One (source, instruction) combination: labels index the dataset's colour and shape lists."""

    source: tuple[int, int, int]  # (colour, shape, background) of the source
    kind: str  # which attribute the instruction changes (one of EDIT_KINDS)
    value: int  # the asked value: a colour index (colour, background) or a shape index
    target: tuple[int, int, int]  # (colour, shape, background) of the edited image


def _known(values: tuple[str, ...]) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute, value: list[str]) -> None:
        bad = [v for v in value if v not in values]
        if bad or len(set(value)) != len(value) or not value:
            raise ValueError(f"{attribute.name}: unknown or repeated {bad or value}; known: {', '.join(values)}")
    return check


@attrs.frozen(kw_only=True)
class ShapesEditConfig(ShapesConfig):
    """Keys of ``[data]`` with ``type = "shapes-edit"``: those of ``type = "shapes"`` (size,
    count, seed, colours, radii, split) with the three original shapes only, plus ``kinds``."""

    size: int = option(default=64, validator=image_side, help="image side in pixels")
    shapes: list[str] = option(factory=lambda: list(SHAPES), validator=_known(SHAPES), help="shape names used")
    kinds: list[str] = option(factory=lambda: list(EDIT_KINDS), validator=_known(EDIT_KINDS),
                              help="which edits: colour, shape, background")
    heldout_fraction: float = option(default=0.0, validator=[ge(0.0), le(0.9)],
                                     help="fraction of (source, instruction) combinations held out")


class ShapesEditDataset(Dataset):
    """Map-style edit triplets; see the module docstring.

    A sample is ``{"source", "image"}`` (``(3, S, S)`` in [-1, 1]; ``image`` is the edited
    target), ``"caption"`` (the instruction), ``"index"``, ``"kind"`` (index into
    :data:`EDIT_KINDS`), ``"value"``, ``"source_labels"`` and ``"target_labels"`` (``(3,)`` long:
    colour, shape, background), and ``cx``, ``cy``, ``radius`` in pixels.
    """

    Config = ShapesEditConfig

    def __init__(self, config: ShapesEditConfig | None = None, **overrides: Any) -> None:
        self.config = config = attrs.evolve(config or ShapesEditConfig(), **overrides)
        self.colours, self.shapes = list(config.colours), list(config.shapes)
        edits = self.all_edits()
        if not edits:
            raise ValueError("shapes-edit: no edit fits these colours, shapes and kinds")
        order = torch.randperm(len(edits), generator=torch.Generator().manual_seed(config.seed)).tolist()
        n_held = round(config.heldout_fraction * len(edits))
        chosen = {"all": range(len(edits)), "train": sorted(order[n_held:]), "heldout": sorted(order[:n_held])}
        self.edits: list[Edit] = [edits[i] for i in chosen[config.split]]
        if not self.edits:
            raise ValueError(f"shapes-edit: split {config.split!r} is empty (heldout_fraction={config.heldout_fraction})")

    def all_edits(self) -> list[Edit]:
        """Every (source, instruction) combination of the configured colours, shapes and kinds."""
        nc, ns = len(self.colours), len(self.shapes)
        kinds = self.config.kinds
        out = []
        for c in range(nc):
            for s in range(ns):
                for b in range(nc):
                    if b == c:
                        continue
                    if "colour" in kinds:
                        out += [Edit((c, s, b), "colour", v, (v, s, b)) for v in range(nc) if v not in (c, b)]
                    if "shape" in kinds:
                        out += [Edit((c, s, b), "shape", v, (c, v, b)) for v in range(ns) if v != s]
                    if "background" in kinds:
                        out += [Edit((c, s, b), "background", v, (c, s, v)) for v in range(nc) if v not in (c, b)]
        return out

    def instruction(self, edit: Edit) -> str:
        """The instruction of an edit (it names the source's shape for colour and shape edits)."""
        shape = self.shapes[edit.source[1]]
        if edit.kind == "colour":
            return f"make the {shape} {self.colours[edit.value]}"
        if edit.kind == "shape":
            return f"turn the {shape} into a {self.shapes[edit.value]}"
        return f"make the background {self.colours[edit.value]}"

    def render(self, labels: tuple[int, int, int], *, cx: float, cy: float, radius: float) -> torch.Tensor:
        """``(3, S, S)`` in [-1, 1]: the shape ``labels`` at the given place."""
        c, s, b = labels
        return render_shape(self.shapes[s], COLOURS[self.colours[c]], COLOURS[self.colours[b]],
                            size=self.config.size, cx=cx, cy=cy, radius=radius)

    def __len__(self) -> int:
        return self.config.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        pick, cx, cy, radius = placement(self.config, index)  # the shapes set's rule
        edit = self.edits[int(pick * len(self.edits)) % len(self.edits)]
        return {"source": self.render(edit.source, cx=cx, cy=cy, radius=radius),
                "image": self.render(edit.target, cx=cx, cy=cy, radius=radius),
                "caption": self.instruction(edit), "index": index, "kind": EDIT_KINDS.index(edit.kind),
                "value": edit.value, "source_labels": torch.tensor(edit.source), "target_labels": torch.tensor(edit.target),
                "cx": cx, "cy": cy, "radius": radius}
