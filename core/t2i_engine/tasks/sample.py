"""``sample``: txt2img and img2img with any model bundle, any sampler, the core guidance.

Steps, Karras spacing and the sampler's own options come from ``[sampler]``; the guidance scale,
rescale and thresholding from ``[guidance]`` (defaults when absent). Every image is one PNG whose
text metadata records the prompt, negative prompt, seed, sampler, steps, guidance and model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from t2i_engine.conditioning.build import build_conditioners
from t2i_engine.conditioning.inputs import load_image
from t2i_engine.config.fields import existing_path, option
from t2i_engine.config.limits import image_side, require_image_memory, seeds_value
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import LatentDiffusionModel, RunContext, StepCallback
from t2i_engine.tasks.common import build_model, inference_precision

__all__ = ["SampleConfig", "SampleTask", "check_output_size", "image_metadata", "sample_batch", "steps_run"]


@attrs.frozen
class SampleConfig:
    """``[task] name = "sample"``."""

    prompts: list[str] = option(factory=list, help="the prompts; images_per_prompt images each")
    negative_prompt: str = option(default="", help="what guidance steers away from ('' = unconditional)")
    width: int = option(default=512, validator=image_side, help="image width in pixels")
    height: int = option(default=512, validator=image_side, help="image height in pixels")
    images_per_prompt: int = option(default=1, validator=attrs.validators.ge(1), help="images per prompt")
    batch_size: int = option(default=1, validator=attrs.validators.ge(1), help="images per forward pass")
    seeds: list[int] | None = option(default=None, validator=seeds_value, help="one seed per image; default engine.seed + index")
    init_image: str | None = existing_path(default=None, kind="file", help="img2img: the source image")
    strength: float = option(default=0.8, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)],
                             help="img2img: fraction of the sampler steps run (1 = ignore the image)")
    # --- batch generation over a prompt file (t2i_engine.tasks.batch, docs/batch-generation.md) ---
    prompt_file: str | None = existing_path(default=None, kind="file",
                                            help="instead of prompts: a file of prompts (text lines, .jsonl or "
                                                 ".csv; path or fsspec URL), sharded across devices, resumable")
    prompt_column: str = option(default="prompt", help="prompt_file .jsonl key / .csv column holding the prompt")
    manifest: str = option(default="manifest.jsonl", help="prompt_file: the JSONL list of images, in output_dir")
    devices: int = option(default=1, validator=attrs.validators.ge(1),
                          help="prompt_file: processes per node (Fabric), each taking every devices*num_nodes-th batch")
    num_nodes: int = option(default=1, validator=attrs.validators.ge(1),
                            help="prompt_file: nodes (launch with torchrun or SLURM; Fabric reads the env)")
    compile: bool = option(default=False, help="torch.compile the denoiser (fullgraph; CUDA graphs on CUDA): the "
                                               "first batch compiles, later ones run faster")


def _load_image(url: str, *, width: int, height: int) -> torch.Tensor:
    """The img2img source ``(1, 3, height, width)`` in [-1, 1]; errors name ``task.init_image``."""
    return load_image(url, width=width, height=height, key="task.init_image")


def _step_reporter(ctx: RunContext, bar: Any, total: int) -> StepCallback:
    """A sampler callback: advance the progress bar and call the ``on_sample_step`` hook."""
    def report(info: Mapping[str, Any]) -> None:
        bar.update(1)
        ctx.plugins.hook.on_sample_step(step=int(info["i"]) + 1, total=total, sigma=float(info["sigma"]))

    return report


def steps_run(sigmas: torch.Tensor, *, img2img: bool, strength: float) -> int:
    """The sampler steps one image runs: all of them, or img2img's tail at ``strength``."""
    if not img2img:
        return len(sigmas) - 1
    from t2i_engine.diffusion.samplers import img2img_start

    return len(img2img_start(torch.zeros(1), sigmas.cpu(), strength=strength, noise=torch.zeros(1))[0]) - 1


def check_output_size(model: LatentDiffusionModel, *, width: int, height: int) -> None:
    """A ConfigError unless ``width`` x ``height`` are multiples of the autoencoder's factor."""
    f = model.autoencoder.downsample_factor
    if width % f or height % f:
        raise ConfigError(f"task.width/height: must be multiples of {f} (the autoencoder's factor), "
                          f"got {width}x{height}")


def sample_batch(model: LatentDiffusionModel, prompts: list[str], seeds: list[int], *, config: SampleConfig,
                 sampler: Any, sigmas: torch.Tensor, guidance: Any, device: torch.device, dtype: torch.dtype,
                 autocast: Any, init: torch.Tensor | None = None, conditioners: Any = None,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1] for one sampler batch of a ``sample`` job, made as
    :class:`SampleTask` makes them: each image's noise from its own seed, a generator seeded by
    the batch's first seed, ``config``'s size and negative prompt, img2img from ``init``
    ``(1, 3, H, W)`` at ``config.strength``; under ``autocast``."""
    from t2i_engine.pipeline import generate, seeded_noise

    f = model.autoencoder.downsample_factor
    noise = seeded_noise(seeds, (model.autoencoder.latent_channels, config.height // f, config.width // f), dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seeds[0])
    with autocast:
        return generate(model, prompts, noise, sampler=sampler, sigmas=sigmas, guidance=guidance,
                        negative_prompts=[config.negative_prompt] * len(prompts),
                        init_images=None if init is None else init.expand(len(prompts), -1, -1, -1),
                        strength=config.strength, generator=gen, callback=callback, conditioners=conditioners)


def image_metadata(ctx: RunContext, model: LatentDiffusionModel, *, prompt: str, seed: int, size: tuple[int, int],
                   steps: int, batch_prompts: list[str], batch_seeds: list[int]) -> dict[str, str]:
    """The PNG text chunks of one image of a ``sample`` run (``ctx.config.task.options`` is its
    :class:`SampleConfig`): prompt, seed, negative prompt, sampler, ``steps`` (of the full plan),
    guidance scale, model, the img2img source, and the recipe
    (:func:`~t2i_engine.utils.recipe.sample_png_metadata`)."""
    from t2i_engine.diffusion.guidance import GuidanceConfig
    from t2i_engine.utils.recipe import sample_png_metadata

    c = ctx.config.task.options
    guidance = ctx.config.guidance or GuidanceConfig()
    meta = {"prompt": prompt, "seed": str(seed), "negative_prompt": c.negative_prompt,
            "sampler": ctx.config.sampler.name, "steps": str(steps),  # type: ignore[union-attr]
            "guidance_scale": str(guidance.guidance_scale),
            "model": str(getattr(model, "description", None) or ctx.config.model.name)}  # type: ignore[union-attr]
    if c.init_image is not None:
        meta |= {"init_image": str(c.init_image), "strength": str(c.strength)}
    return meta | sample_png_metadata(ctx, model, prompt=prompt, seed=seed, size=size,
                                      batch_prompts=batch_prompts, batch_seeds=batch_seeds)


class SampleTask:
    """Write one PNG per (prompt, image) into ``engine.output_dir``."""

    Config = SampleConfig
    applies_conditioners = True  # [[conditioners]] are built once and applied to every image

    def __init__(self, config: SampleConfig) -> None:
        self.config = config

    def _plan(self, ctx: RunContext) -> tuple[list[str], list[int]]:
        c = self.config
        prompts = [p for p in c.prompts for _ in range(c.images_per_prompt)]
        if not prompts:
            raise ConfigError("task.prompts: give at least one prompt")
        seeds = list(c.seeds) if c.seeds is not None else [ctx.seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ConfigError(f"task.seeds: {len(seeds)} seeds for {len(prompts)} images "
                              "(prompts x images_per_prompt)")
        return prompts, seeds

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        if self.config.prompt_file is not None or self.config.devices > 1 or self.config.num_nodes > 1:
            from t2i_engine.tasks.batch import run_batch

            return run_batch(self.config, ctx)
        from tqdm.auto import tqdm

        from t2i_engine.diffusion.guidance import GuidanceConfig
        from t2i_engine.pipeline import sampling_sigmas_for
        from t2i_engine.utils.images import save_png, to_pil

        c = self.config
        if ctx.config.sampler is None:
            raise ConfigError("sampler: task 'sample' needs a [sampler] table, e.g. name = \"ddim\" and steps = 30")
        guidance = ctx.config.guidance or GuidanceConfig()
        if guidance.image_guidance_scale is not None:
            raise ConfigError("guidance.image_guidance_scale: task 'sample' has no source-image conditioning "
                              "(InstructPix2Pix edits use it: task 'edit' of t2i-plugin-instructpix2pix)")
        prompts, seeds = self._plan(ctx)
        require_image_memory("task.width/height", width=c.width, height=c.height,
                             batch=min(c.batch_size, len(prompts)), device=ctx.device)
        sampler = ctx.plugins.build(ctx.config.sampler)
        model: LatentDiffusionModel = build_model(ctx, task="sample")
        check_output_size(model, width=c.width, height=c.height)
        autocast, dtype = inference_precision(ctx, model, compile=c.compile)
        conditioners = build_conditioners(ctx, model, dtype=dtype)
        init = None if c.init_image is None else _load_image(c.init_image, width=c.width, height=c.height).to(dtype)
        sigmas = sampling_sigmas_for(sampler, model.schedule)  # float64: never in the model's precision
        out_dir = Path(ctx.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        total = steps_run(sigmas, img2img=init is not None, strength=c.strength)  # steps each batch runs
        written: list[str] = []
        batches = range(0, len(prompts), c.batch_size)
        for b, start in enumerate(batches):
            chunk, chunk_seeds = prompts[start:start + c.batch_size], seeds[start:start + c.batch_size]
            with tqdm(total=total, desc=f"sample batch {b + 1}/{len(batches)}", unit="step", leave=False) as bar:
                images = sample_batch(model, chunk, chunk_seeds, config=c, sampler=sampler, sigmas=sigmas,
                                      guidance=guidance, device=ctx.device, dtype=dtype, autocast=autocast,
                                      init=init, conditioners=conditioners,
                                      callback=_step_reporter(ctx, bar, total=total))
            for prompt, seed, pil in zip(chunk, chunk_seeds, to_pil(images)):
                path = out_dir / f"{len(written):05d}-{seed}.png"
                meta = image_metadata(ctx, model, prompt=prompt, seed=seed, size=pil.size, steps=len(sigmas) - 1,
                                      batch_prompts=chunk, batch_seeds=chunk_seeds)
                save_png(pil, str(path), metadata=meta)
                written.append(str(path))
        return {"images": written}
