"""``sample-grid`` (the quickstart: one PNG grid for a few prompts) and ``shapes-eval`` (prompt
adherence on held-out shapes prompts, scored by :mod:`t2i_engine.data.shapes_eval`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from t2i_engine.config.fields import option
from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_plugin_sd.model import StableDiffusion

__all__ = ["SampleGridTask", "ShapesEvalTask", "sample_batched"]

_ge1 = attrs.validators.ge(1)


def sample_batched(model: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int], *, sampler: Any,
                   guidance: GuidanceConfig | None, size: int, batch_size: int, progress: bool = True,
                   desc: str = "sampling") -> Tensor:
    """Images ``(N, 3, size, size)`` in [-1, 1], one per ``(prompt, seed)``, by the core's
    :func:`~t2i_engine.pipeline.generate`; a tqdm bar over all sampler steps when ``progress``."""
    from tqdm.auto import tqdm

    from t2i_engine.pipeline import generate, sampling_sigmas_for

    f = model.vae.downsample_factor
    if size % f:
        raise ConfigError(f"task.size must be a multiple of {f}, got {size}")
    device = next(model.unet.parameters()).device
    sigmas = sampling_sigmas_for(sampler, model.schedule, device=device)
    n_batches = -(-len(prompts) // batch_size)
    bar = tqdm(total=n_batches * (len(sigmas) - 1), desc=desc, unit="step", disable=not progress)
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = list(prompts[start:start + batch_size]), seeds[start:start + batch_size]
            noise = torch.cat([torch.randn(1, model.vae.latent_channels, size // f, size // f,
                                           generator=torch.Generator().manual_seed(int(s))) for s in chunk_seeds])
            gen = torch.Generator(device=device).manual_seed(int(chunk_seeds[0]))
            images = generate(model, chunk, noise, sampler=sampler, sigmas=sigmas, guidance=guidance,
                              generator=gen, callback=lambda _info: bar.update(1))
            out.append(images.cpu())  # (b, 3, size, size) in [-1, 1]
    finally:
        bar.close()
    return torch.cat(out)


def _model_and_sampler(ctx: RunContext) -> tuple[StableDiffusion, Any]:
    """The ``[model]`` (a Stable Diffusion model, on the run's device) and the ``[sampler]``."""
    if ctx.config.model is None or ctx.config.sampler is None:
        raise ConfigError("this task needs [model] (type = \"stable-diffusion\") and [sampler] tables")
    model = ctx.plugins.build(ctx.config.model)
    if not isinstance(model, StableDiffusion):
        raise ConfigError(f"[model] type {ctx.config.model.name!r} is not a Stable Diffusion model")
    return model.to(ctx.device).eval(), ctx.plugins.build(ctx.config.sampler)


@attrs.frozen
class SampleGridConfig:
    """``[task] name = "sample-grid"``."""

    prompts: list[str] = option(help="one grid row per prompt")
    images_per_prompt: int = option(default=4, validator=_ge1, help="images per prompt (grid columns)")
    size: int = option(default=64, validator=attrs.validators.ge(8), help="image side in pixels")
    batch_size: int = option(default=16, validator=_ge1, help="images per sampler run")
    filename: str = option(default="grid.png", help="file name inside engine.output_dir")


class SampleGridTask:
    """Sample ``images_per_prompt`` images per prompt and write them as one PNG grid."""

    Config = SampleGridConfig

    def __init__(self, config: SampleGridConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.utils.images import make_grid, save_png

        c = self.config
        model, sampler = _model_and_sampler(ctx)
        prompts = [p for p in c.prompts for _ in range(c.images_per_prompt)]
        seeds = [ctx.seed + i for i in range(len(prompts))]
        images = sample_batched(model, prompts, seeds, sampler=sampler, guidance=ctx.config.guidance, size=c.size,
                                batch_size=c.batch_size)
        path = str(Path(ctx.output_dir) / c.filename)
        save_png(make_grid(images, nrow=c.images_per_prompt), path,
                 metadata={"prompts": "\n".join(c.prompts), "seed": str(ctx.seed), "sampler": ctx.config.sampler.name,
                           "guidance_scale": str((ctx.config.guidance or GuidanceConfig()).guidance_scale)})
        return {"image": path}


@attrs.frozen
class ShapesEvalConfig:
    """``[task] name = "shapes-eval"``; ``[data]`` (type = "shapes", split = "heldout") names the prompts."""

    images_per_prompt: int = option(default=16, validator=_ge1, help="images sampled per held-out prompt")
    batch_size: int = option(default=32, validator=_ge1, help="images per sampler run")
    grid: str | None = option(default="eval-grid.png", help="a grid of the first 64 images (none: no grid)")
    colour_target: float = option(default=0.97, help="target accuracy of shape and background colour")
    shape_target: float = option(default=0.90, help="target accuracy of the shape class")


class ShapesEvalTask:
    """Sample every prompt of a shapes split and score the images with the pixel classifier."""

    Config = ShapesEvalConfig

    def __init__(self, config: ShapesEvalConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.data.shapes import ShapesDataset
        from t2i_engine.data.shapes_eval import ShapeLabels, accuracy, classify_batch, format_table
        from t2i_engine.utils.images import make_grid, save_png

        c = self.config
        if ctx.config.data is None:
            raise ConfigError("shapes-eval needs a [data] table (type = \"shapes\", split = \"heldout\")")
        data = ctx.plugins.build(ctx.config.data)
        if not isinstance(data, ShapesDataset):
            raise ConfigError(f"shapes-eval: [data] type {ctx.config.data.name!r} is not the shapes dataset")
        model, sampler = _model_and_sampler(ctx)
        truth = [ShapeLabels(*combo) for combo in data.combinations for _ in range(c.images_per_prompt)]
        prompts = [data.caption_of(t.colour, t.shape, t.background) for t in truth]
        seeds = [ctx.seed + i for i in range(len(prompts))]
        images = sample_batched(model, prompts, seeds, sampler=sampler, guidance=ctx.config.guidance,
                                size=data.config.size, batch_size=c.batch_size, desc="eval")
        scores = accuracy(classify_batch(images, colours=data.colours, shapes=data.shapes), truth)
        targets = {"colour": c.colour_target, "background": c.colour_target, "shape": c.shape_target}
        print(format_table(scores, count=len(truth), targets=targets))
        summary: dict[str, Any] = {"images": len(truth), "prompts": len(data.combinations), **scores,
                                   "targets_met": all(scores[k] >= v for k, v in targets.items())}
        if c.grid:
            path = str(Path(ctx.output_dir) / c.grid)
            save_png(make_grid(images[:64], nrow=8), path, metadata={"prompts": "\n".join(prompts[:64])})
            summary["grid"] = path
        return summary
