"""``imagen-cascade`` and ``imagen-shapes-eval``: jobs that run an Imagen cascade.

Each ``[[task.stages]]`` entry is one stage file with its own sampler, guidance (CFG scale,
dynamic thresholding p and max) and, for super-resolution stages, augmentation level:

    [[task.stages]]
    checkpoint = "models/imagen-shapes-base.safetensors"
    sampler = { name = "edm", steps = 24, s_churn = 0 }
    guidance = { guidance_scale = 4.0, dynamic_threshold = 0.995 }

    [[task.stages]]
    checkpoint = "models/imagen-shapes-sr.safetensors"
    sampler = { name = "edm", steps = 12 }
    guidance = { guidance_scale = 2.0 }
    aug_level = 0.05
    sigma_min = 1.0       # EDM sampling range (default: the stage file's precond.sigma_min / sigma_max)

A ``checkpoint`` that is a folder is a DeepFloyd IF stage (diffusers ``IFPipeline`` /
``IFSuperResolutionPipeline`` folder) with its own keys: :mod:`t2i_plugin_imagen.if_cascade`.
Stage ``k`` of image ``i`` starts from the noise of seed ``engine.seed + i + 1000 k``; its
generator (seeded by :func:`generator_seed` from the batch's first such seed, a stream apart
from the starting noises) draws the augmentation noise of a super-resolution stage first, then the
sampler's noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from t2i_engine.config.fields import existing_path, option
from t2i_engine.config.structure import structure
from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_engine.pipeline import seeded_noise

_ge1 = attrs.validators.ge(1)


@attrs.frozen
class StageConfig:
    """One ``[[task.stages]]`` entry."""

    checkpoint: str = existing_path(help="the stage file (.safetensors written by this plugin) or a diffusers "
                                    "DeepFloyd IF folder (IFPipeline stage I, IFSuperResolutionPipeline stage II)")
    sampler: dict[str, Any] | None = option(default=None, help="the stage's sampler table: name and the sampler's keys "
                                            "(steps, s_churn ...); default edm (stage files), ddpm (IF folders)")
    guidance: dict[str, Any] = option(factory=dict, help="the stage's guidance keys (guidance_scale, dynamic_threshold ...)")
    aug_level: float | None = option(default=None, help="super-resolution: the augmentation sigma of the low-res "
                                     "input (default: the stage's noise_aug.sample_sigma)")
    sigma_min: float | None = option(default=None, help="EDM stages: the smallest sampling sigma before the last "
                                     "step to 0 (default: the stage file's precond.sigma_min)")
    sigma_max: float | None = option(default=None, help="EDM stages: the sampling sigma the run starts from "
                                     "(default: the stage file's precond.sigma_max)")
    noise_level: int | None = option(default=None, help="IF stage II folders: the DDPM timestep the low-res input "
                                     "is noised to (default 250, IF's)")


class CascadeStep(Protocol):
    """One loaded stage of a cascade: a stage file (:class:`BuiltStage`) or an IF folder
    (:class:`t2i_plugin_imagen.if_cascade.IFStep`)."""

    stage: Any  # the loaded model: its denoiser, text_encoder and autoencoder

    @property
    def image_size(self) -> int:
        """The side this stage samples."""

    @property
    def description(self) -> str:
        """What size-chain errors call this stage."""

    def follows(self, previous: int | None) -> bool:
        """Whether this stage can follow a stage of side ``previous`` (None: be the first)."""

    def sample(self, prompts: Sequence[str], noise: Tensor, *, lowres: Tensor | None,
               generator: torch.Generator) -> Tensor:
        """Images ``(B, 3, S, S)`` in [-1, 1] from ``noise`` (and the previous stage's ``lowres``)."""


@attrs.frozen
class BuiltStage:
    """A stage file of this plugin loaded, its sampler and guidance built."""

    stage: Any
    sampler: Any
    guidance: GuidanceConfig
    aug_level: float | None

    @property
    def image_size(self) -> int:
        """The side this stage samples."""
        return int(self.stage.image_size)

    @property
    def description(self) -> str:
        """What size-chain errors call this stage."""
        return str(self.stage.description)

    def follows(self, previous: int | None) -> bool:
        """Whether this stage can follow a stage of side ``previous`` (None: be the first)."""
        return self.stage.lowres_size == previous

    def sample(self, prompts: Sequence[str], noise: Tensor, *, lowres: Tensor | None,
               generator: torch.Generator) -> Tensor:
        """Images ``(B, 3, S, S)`` in [-1, 1] (:func:`t2i_plugin_imagen.cascade.sample_stage`)."""
        from t2i_plugin_imagen.cascade import sample_stage

        return sample_stage(self.stage, prompts, noise, sampler=self.sampler, guidance=self.guidance, lowres=lowres,
                            aug_sigma=self.aug_level, generator=generator)


def check_chain(key: str, checkpoint: str, step: CascadeStep, previous: int | None) -> None:
    """A base stage first, then each super-resolution stage from the previous stage's size."""
    if not step.follows(previous):
        need = "a base stage" if previous is None else f"a super-resolution stage from {previous} px"
        raise ConfigError(f"{key}.checkpoint: {checkpoint} is {step.description}; here the cascade needs {need}")


def _imagen_step(ctx: RunContext, key: str, sc: StageConfig) -> BuiltStage:
    """A stage file with its sampler, guidance, augmentation level and sampling range."""
    from t2i_plugin_imagen.stage import load_imagen_stage

    if sc.noise_level is not None:
        raise ConfigError(f"{key}.noise_level: only for an IF stage II folder (a stage file sets aug_level)")
    table = dict(sc.sampler or {"name": "edm"})
    name = table.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{key}.sampler: needs name = \"<sampler>\" (e.g. \"edm\")")
    factory = ctx.plugins.get("sampler", name, key=f"{key}.sampler.name").factory
    config_cls = getattr(factory, "Config", None)
    sampler = factory(structure(config_cls, table, f"{key}.sampler")) if config_cls else factory()
    guidance = structure(GuidanceConfig, sc.guidance, f"{key}.guidance")
    stage = load_imagen_stage(sc.checkpoint).to(ctx.device)
    if sc.aug_level is not None and stage.lowres_size is None:
        raise ConfigError(f"{key}.aug_level: a base stage has no low-resolution input to augment")
    try:
        stage.set_sampling_range(sigma_min=sc.sigma_min, sigma_max=sc.sigma_max)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from e
    return BuiltStage(stage, sampler, guidance, sc.aug_level)


def build_stages(ctx: RunContext, stages: Sequence[StageConfig]) -> list[CascadeStep]:
    """Load each stage (a stage file or an IF folder) with its sampling keys; check the sizes chain."""
    from t2i_plugin_imagen.if_cascade import IFStep, build_if_step, is_if_folder

    if not stages:
        raise ConfigError("task.stages: a cascade needs at least one [[task.stages]] entry")
    built: list[CascadeStep] = []
    for i, sc in enumerate(stages):
        key = f"task.stages[{i}]"
        if is_if_folder(sc.checkpoint):
            lender = next((b.stage for b in reversed(built) if isinstance(b, IFStep)), None)
            step: CascadeStep = build_if_step(key, sc, text_from=lender, device=ctx.device)
        else:
            step = _imagen_step(ctx, key, sc)
        check_chain(key, sc.checkpoint, step, built[-1].image_size if built else None)
        built.append(step)
    return built


def generator_seed(first_seed: int, stage: int) -> int:
    """The seed of stage ``stage``'s generator for a batch whose first image has seed
    ``first_seed``: 32 bits of ``numpy.random.SeedSequence((first_seed, stage))``.

    Seeded like the batch's first starting noise, the generator would draw that very noise again
    as the first image's augmentation (or churn, or DDPM step) noise; an offset cannot avoid it,
    since the CPU generator keeps only the low 32 bits of a seed.
    """
    import numpy as np

    return int(np.random.SeedSequence([first_seed % 2**64, stage]).generate_state(1)[0])


def prepare_precision(ctx: RunContext, stages: Sequence[CascadeStep]) -> tuple[Any, torch.dtype]:
    """``engine.precision`` for every stage (:func:`t2i_engine.tasks.common.inference_precision`:
    ``*-mixed`` casts the autocast weights once and samples under autocast, ``*-true`` casts the
    stage and its noise; on the CPU, deep convolutions are packed): the ``(autocast context,
    noise dtype)`` that :func:`run_cascade` takes."""
    from t2i_engine.tasks.common import inference_precision

    precision: tuple[Any, torch.dtype] = (contextlib.nullcontext(), torch.float32)
    for b in stages:
        precision = inference_precision(ctx, b.stage)
    return precision


def run_cascade(stages: Sequence[CascadeStep], prompts: Sequence[str], seeds: Sequence[int], *, batch_size: int,
                device: torch.device, precision: tuple[Any, torch.dtype] | None = None) -> list[Tensor]:
    """Every stage's images ``(N, 3, S_k, S_k)`` in [-1, 1] (CPU float32), one per (prompt, seed);
    stage ``k``'s starting noise is seeded by ``seed + 1000 k``, its generator by
    :func:`generator_seed`; ``precision`` is :func:`prepare_precision`'s (default: float32)."""
    from tqdm.auto import tqdm

    autocast, dtype = precision or (contextlib.nullcontext(), torch.float32)

    outputs: list[list[Tensor]] = [[] for _ in stages]
    for start in tqdm(range(0, len(prompts), batch_size), desc="cascade", unit="batch"):
        chunk, chunk_seeds = list(prompts[start:start + batch_size]), list(seeds[start:start + batch_size])
        low = None
        for k, b in enumerate(stages):
            size = b.image_size
            noise = seeded_noise([s + 1000 * k for s in chunk_seeds], (3, size, size), dtype=dtype).to(device)
            gen = torch.Generator(device=device).manual_seed(generator_seed(chunk_seeds[0], k))
            with autocast:
                low = b.sample(chunk, noise, lowres=low, generator=gen)
            outputs[k].append(low.float().cpu())
    return [torch.cat(o) for o in outputs]


def side_by_side(images: Sequence[Tensor]) -> Tensor:
    """Each stage's images upsampled (nearest) to the last stage's size, interleaved per image:
    ``(N * stages, 3, S, S)`` for a grid with one row per image."""
    size = images[-1].shape[-1]
    same = [F.interpolate(x, size=(size, size), mode="nearest") for x in images]
    return torch.stack(same, dim=1).reshape(-1, 3, size, size)


@attrs.frozen
class CascadeConfig:
    """``[task] name = "imagen-cascade"``."""

    prompts: list[str] = option(help="one grid row per (prompt, image)")
    stages: list[StageConfig] = option(help="the stages, base first ([[task.stages]])")
    images_per_prompt: int = option(default=1, validator=_ge1, help="images per prompt")
    batch_size: int = option(default=8, validator=_ge1, help="images per sampler run")
    filename: str = option(default="cascade.png", help="the grid, inside engine.output_dir")
    side_by_side: bool = option(default=True, help="show every stage's output beside the final one (else final only)")


class CascadeTask:
    """Sample prompts through the cascade; write one PNG (each row: base | SR1 | ...)."""

    Config = CascadeConfig

    def __init__(self, config: CascadeConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.utils.images import make_grid, save_png

        c = self.config
        stages = build_stages(ctx, c.stages)
        prompts = [p for p in c.prompts for _ in range(c.images_per_prompt)]
        seeds = [ctx.seed + i for i in range(len(prompts))]
        images = run_cascade(stages, prompts, seeds, batch_size=c.batch_size, device=ctx.device,
                             precision=prepare_precision(ctx, stages))
        grid = side_by_side(images) if c.side_by_side else images[-1]
        per_row = len(images) if c.side_by_side else 1
        captions = [f"{p} [{b.image_size}px]" for p in prompts for b in stages] if c.side_by_side else prompts
        path = str(Path(ctx.output_dir) / c.filename)
        save_png(make_grid(grid, nrow=per_row, captions=captions), path,
                 metadata={"prompts": "\n".join(c.prompts), "seed": str(ctx.seed),
                           "stages": "\n".join(s.checkpoint for s in c.stages)})
        return {"image": path, "stages": len(stages), "images": len(prompts)}


@attrs.frozen
class CascadeEvalConfig:
    """``[task] name = "imagen-shapes-eval"``; ``[data]`` (type = "shapes", split = "heldout")
    names the prompts, scored at the last stage's size."""

    stages: list[StageConfig] = option(help="the stages, base first ([[task.stages]])")
    images_per_prompt: int = option(default=16, validator=_ge1, help="images sampled per held-out prompt")
    batch_size: int = option(default=32, validator=_ge1, help="images per sampler run")
    grid: str | None = option(default="eval-grid.png", help="a grid of the first 64 final images (none: no grid)")
    colour_target: float = option(default=0.95, help="target accuracy of shape and background colour")
    shape_target: float = option(default=0.90, help="target accuracy of the shape class")


class CascadeEvalTask:
    """Sample every prompt of a shapes split through the cascade and score the final images with
    the core's pixel classifier (:mod:`t2i_engine.data.shapes_eval`)."""

    Config = CascadeEvalConfig

    def __init__(self, config: CascadeEvalConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.data.shapes_eval import ShapeLabels, accuracy, classify_batch, format_table
        from t2i_engine.tasks.shapes_eval import shapes_data
        from t2i_engine.utils.images import make_grid, save_png

        c = self.config
        data = shapes_data(ctx, task="imagen-shapes-eval")
        stages = build_stages(ctx, c.stages)
        if stages[-1].image_size != data.config.size:
            raise ConfigError(f"data.size: the cascade ends at {stages[-1].image_size} px, not {data.config.size}")
        truth = [ShapeLabels(*combo) for combo in data.combinations for _ in range(c.images_per_prompt)]
        prompts = [data.caption_of(t.colour, t.shape, t.background) for t in truth]
        seeds = [ctx.seed + i for i in range(len(prompts))]
        images = run_cascade(stages, prompts, seeds, batch_size=c.batch_size, device=ctx.device,
                             precision=prepare_precision(ctx, stages))
        targets = {"colour": c.colour_target, "background": c.colour_target, "shape": c.shape_target}
        summary: dict[str, Any] = {"images": len(truth), "prompts": len(data.combinations)}
        for k, stage_images in enumerate(images):
            scores = accuracy(classify_batch(stage_images, colours=data.colours, shapes=data.shapes), truth)
            side = stages[k].image_size
            print(f"stage {k} ({side} px):")
            print(format_table(scores, count=len(truth), targets=targets))
            summary[f"stage{k}_{side}px"] = scores
        final = summary[f"stage{len(images) - 1}_{stages[-1].image_size}px"]
        summary["targets_met"] = all(final[k] >= v for k, v in targets.items())
        if c.grid:
            path = str(Path(ctx.output_dir) / c.grid)
            save_png(make_grid(images[-1][:64], nrow=8), path, metadata={"prompts": "\n".join(prompts[:64])})
            summary["grid"] = path
        return summary
