"""``edit``: InstructPix2Pix edits of source images (paths or fsspec URLs), one instruction each.

``[guidance] guidance_scale`` is s_T (default 7.5) and ``image_guidance_scale`` s_I (default 1.5);
diffusers' gate applies (no guidance unless s_T > 1 and s_I >= 1). The other guidance keys
(rescale, thresholding, clipping) are not part of InstructPix2Pix and are refused. Each image is
one PNG of the source's size (floored to the autoencoder's factor), with the instruction, seed,
sampler, steps and both scales in its metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from t2i_engine.config.fields import option
from t2i_engine.config.limits import seeds_value
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext

__all__ = ["EditConfig", "EditTask", "IMAGE_GUIDANCE_DEFAULT", "edit_one", "settle_model"]

IMAGE_GUIDANCE_DEFAULT = 1.5  # the reference edit_cli.py's cfg-image and diffusers' image_guidance_scale


@attrs.frozen
class EditConfig:
    """``[task] name = "edit"``."""

    sources: list[str] = option(help="source images (paths or fsspec URLs), one per instruction; relative "
                                     "paths are relative to the config file")
    prompts: list[str] = option(help="the edit instructions, one per source image")
    negative_prompt: str = option(default="", help="text of the two text-free guidance branches ('' = unconditional)")
    seeds: list[int] | None = option(default=None, validator=seeds_value,
                                     help="one seed per image; default engine.seed + index")
    grid: str | None = option(default=None, help="also write one PNG of this name in output_dir: the sources in "
                                                 "a row above their edits, each instruction under its edit")
    ema: bool = option(default=True, validator=attrs.validators.instance_of(bool),
                       help="a checkpoint with model_ema.* keys (timbrooks' .ckpt): edit with the EMA "
                            "weights (the reference's); false: the trained ones")


def edit_scales(ctx: RunContext) -> tuple[float, float]:
    """(s_T, s_I) from ``[guidance]``; keys InstructPix2Pix does not use are a ConfigError."""
    from t2i_engine.diffusion.guidance import GuidanceConfig

    g = ctx.config.guidance or GuidanceConfig()
    unused = [k for k, off in (("guidance_rescale", 0.0), ("dynamic_threshold", None), ("clip_denoised", False))
              if getattr(g, k) != off]
    if unused:
        raise ConfigError(f"guidance.{unused[0]}: task 'edit' (InstructPix2Pix) does not apply it")
    s_i = IMAGE_GUIDANCE_DEFAULT if g.image_guidance_scale is None else g.image_guidance_scale
    return g.guidance_scale, s_i


def source_url(ctx: RunContext, url: str) -> str:
    """``url`` as given when it is a URL or an absolute path, else relative to the config file's
    folder (as ``[model] checkpoint`` is)."""
    if "://" in url or Path(url).expanduser().is_absolute() or ctx.config.source is None:
        return str(Path(url).expanduser()) if "://" not in url else url
    return str(Path(ctx.config.source).parent / url)


def settle_model(ctx: RunContext, model: Any, *, ema: bool) -> None:
    """Make a built model ready to edit: its EMA or trained UNet chosen (``ema``), checked to be
    an 8-channel editor; ConfigError naming the key otherwise."""
    from t2i_plugin_instructpix2pix.edit import check_edit_model
    from t2i_plugin_instructpix2pix.ema import choose_weights, has_ema

    if ema and has_ema(model) and ctx.config.adapters:
        # adapters are applied by build_model before the EMA UNet could be swapped in
        raise ConfigError("adapters: [[adapters]] on a checkpoint with EMA weights (model_ema.*) are not "
                          "supported yet; set [task] ema = false or use a file without model_ema.* keys")
    choose_weights(model, ema=ema)
    try:
        check_edit_model(model)
    except ValueError as exc:
        raise ConfigError(f"model.checkpoint: {exc}") from exc


def edit_metadata(ctx: RunContext, *, negative_prompt: str, scales: tuple[float, float]) -> dict[str, str]:
    """The PNG text every edit carries beside its prompt, seed and source (the ``edit`` task's
    files and the served edits): negative prompt, sampler and both guidance scales."""
    return {"negative_prompt": negative_prompt, "sampler": ctx.config.sampler.name,
            "guidance_scale": str(scales[0]), "image_guidance_scale": str(scales[1])}


def edit_one(ctx: RunContext, model: Any, source: torch.Tensor, prompt: str, seed: int, *, sampler: Any,
             scales: tuple[float, float], negative_prompt: str, dtype: torch.dtype, autocast: Any,
             callback: Any = None) -> torch.Tensor:
    """One edit ``(1, 3, H, W)`` in [-1, 1] of ``source`` (:func:`~t2i_plugin_instructpix2pix.edit.load_source`)
    as the ``edit`` task makes it: ``seed``'s noise, a generator seeded by it, ``scales`` = (s_T, s_I)."""
    from t2i_engine.pipeline import seeded_noise
    from t2i_plugin_instructpix2pix.edit import edit_images

    f = model.autoencoder.downsample_factor
    noise = seeded_noise([seed], (model.autoencoder.latent_channels, source.shape[-2] // f, source.shape[-1] // f),
                         dtype=dtype)
    with autocast:
        return edit_images(model, [prompt], source, noise, sampler=sampler, text_scale=scales[0],
                           image_scale=scales[1], negative_prompts=[negative_prompt],
                           generator=torch.Generator(device=ctx.device).manual_seed(seed), callback=callback)


class EditTask:
    """Write one edited PNG per (source, instruction) into ``engine.output_dir``."""

    Config = EditConfig

    def __init__(self, config: EditConfig) -> None:
        self.config = config

    def _seeds(self, ctx: RunContext) -> list[int]:
        c = self.config
        if not c.sources or len(c.sources) != len(c.prompts):
            raise ConfigError(f"task.prompts: give one instruction per source image "
                              f"({len(c.sources)} sources, {len(c.prompts)} prompts)")
        seeds = list(c.seeds) if c.seeds is not None else [ctx.seed + i for i in range(len(c.sources))]
        if len(seeds) != len(c.sources):
            raise ConfigError(f"task.seeds: {len(seeds)} seeds for {len(c.sources)} source images")
        return seeds

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.tasks.common import build_model, inference_precision
        from t2i_engine.utils.images import save_png, to_pil
        from t2i_plugin_instructpix2pix.edit import load_source

        c = self.config
        if ctx.config.sampler is None:
            raise ConfigError("sampler: task 'edit' needs a [sampler] table, e.g. name = \"euler_ancestral\" "
                              "and steps = 100 (the reference's)")
        s_t, s_i = edit_scales(ctx)
        seeds = self._seeds(ctx)
        sampler = ctx.plugins.build(ctx.config.sampler)
        model = build_model(ctx, task="edit")
        settle_model(ctx, model, ema=c.ema)
        autocast, dtype = inference_precision(ctx, model)
        f = model.autoencoder.downsample_factor
        out_dir = Path(ctx.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = edit_metadata(ctx, negative_prompt=c.negative_prompt, scales=(s_t, s_i))
        written: list[str] = []
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, (url, prompt, seed) in enumerate(zip(c.sources, c.prompts, seeds)):
            source = load_source(source_url(ctx, url), factor=f, key=f"task.sources[{i}]").to(dtype)
            image = edit_one(ctx, model, source, prompt, seed, sampler=sampler, scales=(s_t, s_i),
                             negative_prompt=c.negative_prompt, dtype=dtype, autocast=autocast)
            path = out_dir / f"{i:05d}-{seed}.png"
            save_png(to_pil(image)[0], str(path), metadata={"prompt": prompt, "seed": str(seed), "source": url, **meta})
            written.append(str(path))
            pairs.append((source.float().cpu(), image.float().cpu()))
        summary: dict[str, Any] = {"images": written}
        if c.grid:
            summary["grid"] = self._grid(pairs, str(out_dir / c.grid), meta)
        return summary

    def _grid(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], path: str, meta: dict[str, str]) -> str:
        from t2i_engine.utils.images import make_grid, save_png

        if len({tuple(s.shape) for s, _ in pairs}) != 1:
            raise ConfigError("task.grid: the sources have different sizes; a grid needs one size (leave grid out)")
        n = len(pairs)
        images = torch.cat([s for s, _ in pairs] + [e for _, e in pairs])
        grid = make_grid(images, nrow=n, captions=["source"] * n + list(self.config.prompts))
        return save_png(grid, path, metadata={"prompts": "\n".join(self.config.prompts), **meta})
