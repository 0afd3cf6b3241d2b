"""Paired datasets for ControlNet training: every sample holds an ``image`` (the target), its
``hint`` (the control image), both ``(3, H, W)`` in [-1, 1] and cropped and flipped alike, and a
``caption``.

* ``controlnet-pairs``: the layout of the original ``fill50k`` tutorial dataset: a folder with a
  ``prompt.json`` of JSON lines ``{"source": "source/0.png", "target": "target/0.png", "prompt":
  "..."}`` (paths relative to the folder; ``source`` is the hint, ``target`` the image);
* ``controlnet-shapes``: the core's procedural shapes (:class:`t2i_engine.data.shapes.ShapesDataset`)
  with the shape's own mask or outline, where the sample drew it, as the hint (the embedded demo).

A WebDataset with a hint image per sample is the core's ``webdataset`` type with
``paired_keys = ["hint.png"]`` (and the training task's ``hint_key = "hint.png"``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import attrs
import fsspec
import torch.nn.functional as F
from attrs.validators import ge, in_
from torch import Tensor
from torch.utils.data import Dataset

from t2i_engine.config.fields import existing_path, option
from t2i_engine.data.bad_samples import BadSamples
from t2i_engine.data.common import TransformOptions, decode_image, sample_generator
from t2i_engine.data.shapes import ShapesConfig, ShapesDataset, shape_mask
from t2i_engine.errors import DataError

__all__ = ["PromptJsonPairs", "ShapeHints", "hint_mask", "outline", "shape_hint"]


@attrs.frozen(kw_only=True)
class PromptJsonConfig(TransformOptions):
    """Keys of ``[data]`` with ``type = "controlnet-pairs"``."""

    root: str = existing_path(kind="dir", help="the folder holding prompt.json (path or fsspec URL)")
    prompt_file: str = option(default="prompt.json", help="the JSON-lines file inside root")
    source_key: str = option(default="source", help="the column naming the hint image")
    target_key: str = option(default="target", help="the column naming the target image")
    prompt_key: str = option(default="prompt", help="the column holding the caption")


class PromptJsonPairs(Dataset):
    """Map-style dataset of ``{"image", "hint", "caption", "index"}`` from a ``prompt.json`` folder.

    An undecodable pair is skipped (the next one is served in its place) and counted, as the
    core's image folders do."""

    Config = PromptJsonConfig

    def __init__(self, config: PromptJsonConfig) -> None:
        self.config = config
        self.fs, root = fsspec.core.url_to_fs(config.root)
        self.root = root.rstrip("/")
        self.items = self._index()
        self.transform = config.transform()
        self.bad_samples = BadSamples(min_seen=min(32, len(self.items)))

    def _index(self) -> list[tuple[str, str, str]]:
        c = self.config
        path = f"{self.root}/{c.prompt_file}"
        if not self.fs.isfile(path):
            raise DataError(f"{c.root}: no {c.prompt_file} (JSON lines of {c.source_key}, {c.target_key}, "
                            f"{c.prompt_key})")
        items = []
        with self.fs.open(path, "rt") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not a JSON object ({exc.msg})") from exc
                missing = [k for k in (c.source_key, c.target_key, c.prompt_key) if k not in row]
                if missing:
                    raise DataError(f"{path}:{n}: missing {', '.join(repr(k) for k in missing)}")
                items.append((f"{self.root}/{row[c.source_key]}", f"{self.root}/{row[c.target_key]}",
                              str(row[c.prompt_key])))
        if not items:
            raise DataError(f"{path}: no samples")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> dict[str, Any]:
        source, target, prompt = self.items[index]
        images = {"image": decode_image(self.fs.cat_file(target)), "hint": decode_image(self.fs.cat_file(source))}
        out: dict[str, Any] = self.transform(images, generator=sample_generator(self.config.seed, target))
        return {**out, "caption": prompt, "index": index}

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.items)):
            i = (index + attempt) % len(self.items)
            try:
                sample = self._load(i)
            except Exception as e:  # undecodable, truncated, missing: skip to the next one
                self.bad_samples.failed(self.items[i][1], e)
                continue
            self.bad_samples.ok(self.items[i][1])
            return self.bad_samples.attach(sample)
        raise DataError(f"{self.config.root}: no pair could be decoded; first bad: "
                        f"{'; '.join(self.bad_samples.first_bad)}")


def outline(mask: Tensor, *, width: int) -> Tensor:
    """The ``width``-pixel inner border of a bool ``(H, W)`` mask: the mask minus its erosion."""
    k = 2 * width + 1
    inside = -F.max_pool2d(-(mask.float()[None, None]), k, stride=1, padding=width)[0, 0]  # erosion
    return mask & (inside < 0.5)


def shape_hint(shape: str, *, size: int, cx: float, cy: float, radius: float,
               kind: Literal["mask", "outline"] = "mask", width: int = 2) -> Tensor:
    """The hint of one shape: white where it is (its ``mask``, or its ``outline``) on black,
    ``(3, size, size)`` in [-1, 1]."""
    mask = shape_mask(shape, size=size, cx=cx, cy=cy, radius=radius)
    if kind == "outline":
        mask = outline(mask, width=width)
    return (mask.float() * 2 - 1).expand(3, -1, -1).clone()


@attrs.frozen(kw_only=True)
class ShapeHintsConfig(ShapesConfig):
    """Keys of ``[data]`` with ``type = "controlnet-shapes"``: the shapes dataset's and the hint's."""

    hint: Literal["mask", "outline"] = option(default="mask", validator=in_(("mask", "outline")),
                                              help="the hint: the shape's filled mask or its outline")
    outline_width: int = option(default=2, validator=ge(1), help="outline: its width in pixels")
    start_index: int = option(default=0, validator=ge(0),
                              help="sample i is the split's sample start_index + i (fresh placements and noise "
                                   "of the same prompts: a validation set past a training run's count)")


class ShapeHints(Dataset):
    """The shapes dataset with the shape's mask (or outline) as a ``hint`` (white on black).

    ``start_index`` shifts the window of the split's samples: sample ``i`` is the shapes split's
    sample ``start_index + i`` (its prompt, placement and ``index``), so a validation set of the
    training prompts can take placements that a training run of ``count`` samples never drew."""

    Config = ShapeHintsConfig

    def __init__(self, config: ShapeHintsConfig | None = None, **overrides: Any) -> None:
        self.config = config = attrs.evolve(config or ShapeHintsConfig(), **overrides)
        shapes_keys = {f.name for f in attrs.fields(ShapesConfig)}
        base = {k: getattr(config, k) for k in shapes_keys}
        self.base = ShapesDataset(ShapesConfig(**{**base, "count": config.count + config.start_index}))
        self.colours, self.shapes = self.base.colours, self.base.shapes  # what shapes_eval's labels index

    def __len__(self) -> int:
        return self.config.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        sample = self.base[self.config.start_index + index]
        shape = self.shapes[sample["shape_label"]]
        hint = shape_hint(shape, size=self.config.size, cx=sample["cx"], cy=sample["cy"], radius=sample["radius"],
                          kind=self.config.hint, width=self.config.outline_width)
        return {**sample, "hint": hint}


def hint_mask(hint: Tensor) -> Tensor:
    """Where a white-on-black hint ``(3, H, W)`` in [-1, 1] is white: ``(H, W)`` bool."""
    return hint.float().mean(0) > 0

