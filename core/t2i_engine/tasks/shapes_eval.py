"""``shapes-eval``: prompt adherence of any latent diffusion model on a split of the procedural
shapes dataset, scored by the deterministic pixel classifier of :mod:`t2i_engine.data.shapes_eval`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from t2i_engine.config.fields import option
from t2i_engine.config.limits import require_image_memory
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_engine.tasks.grid import model_and_sampler, sample_batched

__all__ = ["ShapesEvalConfig", "ShapesEvalTask"]

_ge1 = attrs.validators.ge(1)


@attrs.frozen
class ShapesEvalConfig:
    """``[task] name = "shapes-eval"``; ``[data]`` (type = "shapes", split = "heldout") names the prompts."""

    images_per_prompt: int = option(default=16, validator=_ge1, help="images sampled per held-out prompt")
    batch_size: int = option(default=32, validator=_ge1, help="images per sampler run")
    grid: str | None = option(default="eval-grid.png", help="a grid of the first 64 images (none: no grid)")
    colour_target: float = option(default=0.97, help="target accuracy of shape and background colour")
    shape_target: float = option(default=0.90, help="target accuracy of the shape class")
    shape_words: dict[str, str] = option(factory=dict, help="prompt word for a shape, e.g. { plus = \"sks\" } "
                                         "(a DreamBooth identifier); default: the shape's name")
    classifier_shapes: list[str] | None = option(default=None, help="shapes the classifier chooses among "
                                                 "(default: the dataset's); must include the dataset's")
    exclude_prompts: list[str] = option(factory=list, help="prompts of the split left out, as sampled (after "
                                        "shape_words): e.g. a DreamBooth run's instance captions, so that the "
                                        "rest of a training split is a validation set")


def shapes_data(ctx: RunContext, *, task: str) -> Any:
    """The job's ``[data]`` as a :class:`~t2i_engine.data.shapes.ShapesDataset`, for an evaluation
    task named ``task``; a ConfigError when the table is missing or of another type."""
    from t2i_engine.data.shapes import ShapesDataset

    if ctx.config.data is None:
        raise ConfigError(f"{task} needs a [data] table (type = \"shapes\", split = \"heldout\")")
    data = ctx.plugins.build(ctx.config.data)
    if not isinstance(data, ShapesDataset):
        raise ConfigError(f"{task}: [data] type {ctx.config.data.name!r} is not the shapes dataset")
    return data


class ShapesEvalTask:
    """Sample every prompt of a shapes split and score the images with the pixel classifier."""

    Config = ShapesEvalConfig

    def __init__(self, config: ShapesEvalConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.data.shapes_eval import ShapeLabels, accuracy, classify_batch, format_table
        from t2i_engine.utils.images import make_grid, save_png

        c = self.config
        data = shapes_data(ctx, task="shapes-eval")
        unknown = sorted(set(c.shape_words) - set(data.shapes))
        if unknown:
            raise ConfigError(f"task.shape_words: {', '.join(unknown)} is not a shape of [data] "
                              f"({', '.join(data.shapes)})")
        candidates = self._candidates(data.shapes)
        captioned = self._captioned(data)
        truth = [ShapeLabels(colour, candidates.index(data.shapes[shape]), background)
                 for (colour, shape, background), _ in captioned for _ in range(c.images_per_prompt)]
        side = data.config.size
        require_image_memory("task.batch_size", width=side, height=side, batch=min(c.batch_size, len(truth)),
                             device=ctx.device)  # one sampler batch on the device ...
        require_image_memory("task.images_per_prompt", width=side, height=side, batch=len(truth),
                             device=torch.device("cpu"))  # ... and every image, gathered on the CPU
        model, sampler, precision = model_and_sampler(ctx, task="shapes-eval")
        prompts = [caption for _, caption in captioned for _ in range(c.images_per_prompt)]
        seeds = [ctx.seed + i for i in range(len(prompts))]
        images = sample_batched(model, prompts, seeds, sampler=sampler, guidance=ctx.config.guidance,
                                size=data.config.size, batch_size=c.batch_size, desc="eval", precision=precision)
        scores = accuracy(classify_batch(images, colours=data.colours, shapes=candidates), truth)
        targets = {"colour": c.colour_target, "background": c.colour_target, "shape": c.shape_target}
        print(format_table(scores, count=len(truth), targets=targets))
        summary: dict[str, Any] = {"images": len(truth), "prompts": len(captioned), **scores,
                                   "targets_met": all(scores[k] >= v for k, v in targets.items())}
        if c.grid:
            path = str(Path(ctx.output_dir) / c.grid)
            save_png(make_grid(images[:64], nrow=8), path, metadata={"prompts": "\n".join(prompts[:64])})
            summary["grid"] = path
        return summary

    def _captioned(self, data: Any) -> list[tuple[tuple[int, int, int], str]]:
        """``(label triple, prompt)`` of the split, less those whose prompt ``exclude_prompts``
        names; a ConfigError names an excluded prompt that is not one of the split's, or an empty rest."""
        words = self.config.shape_words
        excluded = set(self.config.exclude_prompts)
        prompts = [data.caption_of(*combo, words=words) for combo in data.combinations]
        unknown = sorted(excluded - set(prompts))
        if unknown:
            raise ConfigError(f"task.exclude_prompts: {'; '.join(repr(p) for p in unknown)} is not a prompt of "
                              f"the [data] split ({len(prompts)} prompts, e.g. {prompts[0]!r})")
        kept = [(combo, prompt) for combo, prompt in zip(data.combinations, prompts) if prompt not in excluded]
        if not kept:
            raise ConfigError("task.exclude_prompts leaves no prompt of the [data] split")
        return kept

    def _candidates(self, shapes: list[str]) -> list[str]:
        from t2i_engine.data.shapes import ALL_SHAPES

        chosen = self.config.classifier_shapes
        if chosen is None:
            return list(shapes)
        bad = sorted(set(chosen) - set(ALL_SHAPES)) or sorted(set(shapes) - set(chosen))
        if bad or len(set(chosen)) != len(chosen):
            raise ConfigError(f"task.classifier_shapes: {chosen} must name known shapes ({', '.join(ALL_SHAPES)}) "
                              f"once each and include every shape of [data] ({', '.join(shapes)})")
        return list(chosen)
