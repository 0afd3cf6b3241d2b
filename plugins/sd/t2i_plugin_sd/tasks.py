"""The ``sample`` and ``train`` tasks of the Stable Diffusion plugin."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from t2i_engine.config.fields import existing_path, option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_plugin_sd.model import StableDiffusion


def _model(ctx: RunContext) -> StableDiffusion:
    if ctx.config.model is None:
        raise ConfigError("this task needs a [model] table (type = \"stable-diffusion\")")
    model = ctx.plugins.build(ctx.config.model)
    if not isinstance(model, StableDiffusion):
        raise ConfigError(f"[model] type {ctx.config.model.name!r} is not a Stable Diffusion model")
    return model.to(ctx.device)


@attrs.frozen
class SampleConfig:
    """``[task] name = "sample"``."""

    prompts: list[str] = option(help="one image set per prompt")
    negative_prompt: str = option(default="", help="what guidance steers away from ('' = unconditional)")
    steps: int = option(default=30, validator=attrs.validators.ge(1), help="sampler steps")
    guidance_scale: float = option(default=7.5, validator=attrs.validators.ge(0.0), help="classifier-free guidance")
    width: int = option(default=512, validator=attrs.validators.ge(8), help="image width in pixels")
    height: int = option(default=512, validator=attrs.validators.ge(8), help="image height in pixels")
    images_per_prompt: int = option(default=1, validator=attrs.validators.ge(1), help="images per prompt")
    batch_size: int = option(default=1, validator=attrs.validators.ge(1), help="images per forward pass")
    seeds: list[int] | None = option(default=None, help="one seed per image; default engine seed + index")
    init_image: str | None = existing_path(default=None, help="img2img source image")
    strength: float = option(default=0.8, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)],
                             help="img2img: fraction of the steps run")


class SampleTask:
    """txt2img / img2img: writes one PNG per image with the prompt, seed, sampler and model in
    its text metadata."""

    Config = SampleConfig

    def __init__(self, config: SampleConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.utils.images import from_pil, save_png, to_pil
        from t2i_plugin_sd.pipeline import generate

        c = self.config
        if ctx.config.sampler is None:
            raise ConfigError("the sample task needs a [sampler] table, e.g. name = \"ddim\"")
        sampler = ctx.plugins.build(ctx.config.sampler)
        model = _model(ctx)
        f = model.vae.downsample_factor
        if c.width % f or c.height % f:
            raise ConfigError(f"task.width/height must be multiples of {f}, got {c.width}x{c.height}")
        jobs = [(p, i) for p in c.prompts for i in range(c.images_per_prompt)]
        seeds = list(c.seeds) if c.seeds is not None else [ctx.seed + i for i in range(len(jobs))]
        if len(seeds) != len(jobs):
            raise ConfigError(f"task.seeds: {len(seeds)} seeds for {len(jobs)} images")
        init = None
        if c.init_image is not None:
            from PIL import Image

            img = Image.open(c.init_image).convert("RGB").resize((c.width, c.height))
            init = from_pil(img)[None]
        out_dir = Path(ctx.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for start in range(0, len(jobs), c.batch_size):
            chunk, chunk_seeds = jobs[start:start + c.batch_size], seeds[start:start + c.batch_size]
            noise = torch.cat([torch.randn(1, model.vae.latent_channels, c.height // f, c.width // f,
                                           generator=torch.Generator().manual_seed(s)) for s in chunk_seeds])
            gen = torch.Generator(device=ctx.device).manual_seed(chunk_seeds[0])
            images = generate(model, [p for p, _ in chunk], noise, sampler=sampler, steps=c.steps,
                              guidance_scale=c.guidance_scale, negative_prompts=[c.negative_prompt] * len(chunk),
                              init_images=None if init is None else init.expand(len(chunk), -1, -1, -1),
                              strength=c.strength, generator=gen)
            for (prompt, _), seed, pil in zip(chunk, chunk_seeds, to_pil(images * 2 - 1)):
                path = out_dir / f"{len(written):05d}-{seed}.png"
                save_png(pil, str(path), metadata={
                    "prompt": prompt, "negative_prompt": c.negative_prompt, "seed": str(seed),
                    "sampler": ctx.config.sampler.name, "steps": str(c.steps), "guidance_scale": str(c.guidance_scale),
                    "model": f"stable-diffusion ({model.prediction})"})
                written.append(str(path))
        return {"images": written}


@attrs.frozen
class TrainTaskConfig:
    """``[task] name = "train"`` (the loop itself is configured by ``[train]``)."""

    caption_dropout: float = option(default=0.1, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)],
                                    help="probability a caption is replaced by '' (the unconditional prompt)")
    train_text_encoder: bool = option(default=False, help="also train the text encoder")
    export: str | None = option(default=None, help="after training write the model here as a diffusers folder")


class TrainTask:
    """Fine-tune the UNet (and optionally the text encoder) with the core Fabric loop."""

    Config = TrainTaskConfig

    def __init__(self, config: TrainTaskConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.training.loop import fit
        from t2i_plugin_sd.trainable import SDTrainable

        if ctx.config.data is None or ctx.config.train is None:
            raise ConfigError("the train task needs [data] and [train] tables")
        model = _model(ctx)
        trainable = SDTrainable(model, caption_dropout=self.config.caption_dropout,
                                train_text_encoder=self.config.train_text_encoder)
        dataset = ctx.plugins.build(ctx.config.data)
        summary = fit(trainable, dataset, ctx.config.train, output_dir=ctx.output_dir, seed=ctx.seed,
                      hooks=getattr(ctx.plugins, "hook", None))
        if self.config.export:
            from t2i_plugin_sd.diffusers_folder import DiffusersFolder

            DiffusersFolder().save(model, self.config.export)
            summary = {**summary, "exported": self.config.export}
        return summary
