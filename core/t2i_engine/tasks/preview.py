"""``preview-data``: write a grid of the first samples of ``[data]`` to a PNG.

A quick look at what training will see (after transforms), and a job that runs with the core
alone: no model plugin needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from t2i_engine.config.fields import option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_engine.utils.images import from_pil, make_grid, save_png


class PreviewData:
    """Render the first ``count`` samples of the configured dataset as one grid."""

    @attrs.frozen
    class Config:
        count: int = option(default=16, validator=attrs.validators.ge(1), help="samples to show")
        nrow: int | None = option(default=None, help="images per row (default: square)")
        filename: str = option(default="preview.png", help="file name inside engine.output_dir")

    def __init__(self, config: Config) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        if ctx.config.data is None:
            raise ConfigError("data: task 'preview-data' needs a [data] table (type = a dataset)")
        dataset = ctx.plugins.build(ctx.config.data)
        images, captions = [], []
        for sample in dataset:
            image = sample["image"]
            if not isinstance(image, torch.Tensor):
                image = from_pil(image)
            images.append(image.float())
            captions.append(str(sample.get("caption", "")))
            if len(images) >= self.config.count:
                break
        if not images:
            raise ConfigError(f"data: dataset '{ctx.config.data.name}' yielded no samples")
        grid = make_grid(torch.stack(images), nrow=self.config.nrow)
        path = str(ctx.output_dir / self.config.filename)
        save_png(grid, path, metadata={"captions": "\n".join(captions)})
        return {"image": path, "samples": len(images)}
