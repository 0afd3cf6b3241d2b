"""``sample-grid``: sample a few prompts with any latent diffusion model and write ONE PNG grid
(one row per prompt). The quickstart runs it."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from t2i_engine.conditioning.build import build_conditioners
from t2i_engine.conditioning.chain import ConditionerChain
from t2i_engine.config.fields import option
from t2i_engine.config.limits import image_side, require_image_memory
from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import LatentDiffusionModel, RunContext, StepCallback
from t2i_engine.pipeline import generate, sampling_sigmas_for, seeded_noise
from t2i_engine.tasks.common import build_model, inference_precision

__all__ = ["SampleGridConfig", "SampleGridTask", "model_and_sampler", "sample_batched"]

_ge1 = attrs.validators.ge(1)


def sample_batched(model: LatentDiffusionModel, prompts: Sequence[str], seeds: Sequence[int], *, sampler: Any,
                   guidance: GuidanceConfig | None, size: int, batch_size: int, progress: bool = True,
                   desc: str = "sampling", on_step: StepCallback | None = None,
                   precision: tuple[Any, torch.dtype] | None = None,
                   conditioners: ConditionerChain | None = None) -> Tensor:
    """Images ``(N, 3, size, size)`` in [-1, 1], one per ``(prompt, seed)``, by the core's
    :func:`~t2i_engine.pipeline.generate`; a tqdm bar over all sampler steps when ``progress``,
    and ``on_step`` called after every sampler step. ``precision`` is the ``(context, noise
    dtype)`` pair of :func:`~t2i_engine.tasks.common.inference_precision` (default: float32);
    ``conditioners`` the run's chain (:func:`~t2i_engine.conditioning.build_conditioners`)."""
    from tqdm.auto import tqdm

    autocast, dtype = precision or (contextlib.nullcontext(), torch.float32)

    f = model.autoencoder.downsample_factor
    if size % f:
        raise ConfigError(f"task.size must be a multiple of {f}, got {size}")
    device = next(model.denoiser.parameters()).device
    sigmas = sampling_sigmas_for(sampler, model.schedule, device=device)
    n_batches = -(-len(prompts) // batch_size)
    bar = tqdm(total=n_batches * (len(sigmas) - 1), desc=desc, unit="step", disable=not progress)
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = list(prompts[start:start + batch_size]), seeds[start:start + batch_size]
            noise = seeded_noise(chunk_seeds, (model.autoencoder.latent_channels, size // f, size // f), dtype=dtype)
            gen = torch.Generator(device=device).manual_seed(int(chunk_seeds[0]))

            def step(info: dict[str, Any]) -> None:
                bar.update(1)
                if on_step is not None:
                    on_step(info)

            with autocast:
                images = generate(model, chunk, noise, sampler=sampler, sigmas=sigmas, guidance=guidance,
                                  generator=gen, callback=step, conditioners=conditioners)
            out.append(images.float().cpu())  # (b, 3, size, size) in [-1, 1]
    finally:
        bar.close()
    return torch.cat(out)


def model_and_sampler(ctx: RunContext, *, task: str) -> tuple[LatentDiffusionModel, Any, tuple[Any, torch.dtype]]:
    """The ``[model]`` (on the run's device, in eval mode, prepared for ``engine.precision`` by
    :func:`~t2i_engine.tasks.common.inference_precision`), the ``[sampler]`` of the run, and the
    ``(context, noise dtype)`` pair to pass to :func:`sample_batched` as ``precision``."""
    if ctx.config.sampler is None:
        raise ConfigError(f"sampler: task '{task}' needs a [sampler] table (e.g. name = \"dpmpp_2m\")")
    model = build_model(ctx, task=task).eval()
    precision = inference_precision(ctx, model)
    return model, ctx.plugins.build(ctx.config.sampler), precision


def hook_reporter(ctx: RunContext, total: int) -> StepCallback:
    """A sampler callback calling the ``on_sample_step`` hook (``total`` steps per sampler run)."""
    def report(info: dict[str, Any]) -> None:
        ctx.plugins.hook.on_sample_step(step=int(info["i"]) + 1, total=total, sigma=float(info["sigma"]))

    return report


@attrs.frozen
class SampleGridConfig:
    """``[task] name = "sample-grid"``."""

    prompts: list[str] = option(help="one grid row per prompt")
    images_per_prompt: int = option(default=4, validator=_ge1, help="images per prompt (grid columns)")
    size: int = option(default=64, validator=image_side, help="image side in pixels")
    batch_size: int = option(default=16, validator=_ge1, help="images per sampler run")
    filename: str = option(default="grid.png", help="file name inside engine.output_dir")
    captions: bool = option(default=True, help="write each tile's prompt under it")


class SampleGridTask:
    """Sample ``images_per_prompt`` images per prompt and write them as one PNG grid."""

    Config = SampleGridConfig
    applies_conditioners = True  # [[conditioners]] are built once and applied to every tile

    def __init__(self, config: SampleGridConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.utils.images import make_grid, save_png

        c = self.config
        prompts = [p for p in c.prompts for _ in range(c.images_per_prompt)]
        require_image_memory("task.size", width=c.size, height=c.size, batch=min(c.batch_size, len(prompts)),
                             device=ctx.device)  # one sampler batch on the device ...
        require_image_memory("task.size", width=c.size, height=c.size, batch=len(prompts),
                             device=torch.device("cpu"))  # ... and the whole grid, gathered on the CPU
        model, sampler, precision = model_and_sampler(ctx, task="sample-grid")
        seeds = [ctx.seed + i for i in range(len(prompts))]
        steps = len(sampling_sigmas_for(sampler, model.schedule)) - 1
        conditioners = build_conditioners(ctx, model, dtype=precision[1])
        images = sample_batched(model, prompts, seeds, sampler=sampler, guidance=ctx.config.guidance, size=c.size,
                                batch_size=c.batch_size, on_step=hook_reporter(ctx, steps), precision=precision,
                                conditioners=conditioners)
        path = str(Path(ctx.output_dir) / c.filename)
        save_png(make_grid(images, nrow=c.images_per_prompt, captions=prompts if c.captions else None), path,
                 metadata={"prompts": "\n".join(c.prompts), "seed": str(ctx.seed), "sampler": ctx.config.sampler.name,
                           "guidance_scale": str((ctx.config.guidance or GuidanceConfig()).guidance_scale)})
        return {"image": path}


