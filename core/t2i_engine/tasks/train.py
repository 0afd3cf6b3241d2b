"""``train``: fine-tune a model bundle with the core Fabric loop, then export its EMA weights.

The model's :meth:`~t2i_engine.interfaces.LatentDiffusionModel.trainable` wrapper decides what
trains (Stable Diffusion: the UNet, optionally the text encoder); ``[train]`` configures the loop
and ``[data]`` the dataset (images and captions, or ``type = "precached"`` shards written by the
``precache`` task). When ``train.ema`` is on, the EMA weights are copied into the model after the
final checkpoint, so ``export`` writes them. A run stopped early (SIGTERM) writes no export: its
checkpoint holds the progress and the resumed run exports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from t2i_engine.config.fields import option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_engine.tasks.common import build_model, output_path

__all__ = ["TrainTask", "TrainTaskConfig", "conditioner_kwargs"]


def conditioner_kwargs(ctx: RunContext, model: Any) -> dict[str, Any]:
    """``{"conditioners": chain}`` for ``model.trainable`` when the job has ``[[conditioners]]``
    (a ConfigError when the model's ``trainable`` does not take them), else ``{}``."""
    import inspect

    from t2i_engine.conditioning.build import build_conditioners

    chain = build_conditioners(ctx, model)
    if chain is None:
        return {}
    if "conditioners" not in inspect.signature(model.trainable).parameters:
        name = ctx.config.model.name  # type: ignore[union-attr]
        raise ConfigError(f"conditioners: model '{name}' cannot train with [[conditioners]] (its trainable() "
                          "takes no conditioners=); remove them or use a model that does")
    return {"conditioners": chain}


@attrs.frozen
class TrainTaskConfig:
    """``[task] name = "train"`` (the loop itself is configured by ``[train]``)."""

    caption_dropout: float = option(default=0.1, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)],
                                    help="probability a caption is replaced by '' (the unconditional prompt)")
    train_text_encoder: bool = option(default=False, help="also train the text encoder")
    export: str | None = option(default=None, help="after training write the model here (relative: inside "
                                "engine.output_dir)")
    export_format: Literal["diffusers", "single-file"] | None = option(
        default=None, help="format of the export (default: the model's own, diffusers for Stable Diffusion)")


class TrainTask:
    """Train, checkpoint, and optionally export the (EMA) weights."""

    Config = TrainTaskConfig
    applies_conditioners = True  # trained with the model: their parameters join the optimizer

    def __init__(self, config: TrainTaskConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.training.config import TrainConfig
        from t2i_engine.training.loop import fit, interrupted

        if ctx.config.data is None:
            raise ConfigError("data: task 'train' needs a [data] table (type = a dataset, e.g. \"shapes\")")
        train = ctx.config.train or TrainConfig()
        if self.config.export and train.strategy == "fsdp":
            raise ConfigError("task.export: not supported with train.strategy = 'fsdp' yet (the weights are "
                              "sharded after training); export from a run with strategy = 'ddp', or load the "
                              "checkpoint's fabric.ckpt")
        model = build_model(ctx, task="train")
        trainable = model.trainable(caption_dropout=self.config.caption_dropout,
                                    train_text_encoder=self.config.train_text_encoder,
                                    **conditioner_kwargs(ctx, model))
        dataset = ctx.plugins.build(ctx.config.data)
        summary = fit(trainable, dataset, train, output_dir=ctx.output_dir,
                      seed=ctx.seed, hooks=ctx.plugins.hook, copy_ema=True)
        if self.config.export and not interrupted(summary):  # a partial model must not replace the export
            url = output_path(ctx, self.config.export)
            model.save(url, format=self.config.export_format)
            summary = {**summary, "exported": url}
        return summary
