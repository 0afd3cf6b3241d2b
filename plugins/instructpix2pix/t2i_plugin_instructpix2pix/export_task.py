"""``edit-export``: convert an InstructPix2Pix checkpoint (timbrooks' Lightning ``.ckpt``, an A1111
``.safetensors``, a diffusers folder, a ``.nemo``) into a diffusers folder or one single file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch

from t2i_engine.config.fields import option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext

__all__ = ["EditExportConfig", "EditExportTask"]


@attrs.frozen
class EditExportConfig:
    """``[task] name = "edit-export"``."""

    output: str = option(help="where to write (relative: inside engine.output_dir)")
    format: Literal["diffusers", "single-file"] = option(default="diffusers",
                                                         help="a diffusers folder or one CompVis-layout safetensors file")
    ema: bool = option(default=True, help="a checkpoint with model_ema.* keys: export its EMA weights (false: the "
                                          "trained ones)")
    dtype: Literal["float32", "float16"] = option(default="float32", help="dtype of the written floats")


class EditExportTask:
    """Load ``[model]``, settle its EMA weights, check it is an edit model, write it."""

    Config = EditExportConfig

    def __init__(self, config: EditExportConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.tasks.common import build_model, output_path
        from t2i_plugin_instructpix2pix.edit import check_edit_model
        from t2i_plugin_instructpix2pix.ema import choose_weights
        from t2i_plugin_instructpix2pix.formats import save_edit_model

        c = self.config
        if ctx.config.adapters:
            raise ConfigError("adapters: edit-export writes the checkpoint's own weights; bake adapters with "
                              "edit-train or leave [[adapters]] out")
        model = build_model(ctx, task="edit-export")
        choose_weights(model, ema=c.ema)
        try:
            check_edit_model(model)
        except ValueError as exc:
            raise ConfigError(f"model.checkpoint: {exc}") from exc
        url = output_path(ctx, c.output)
        save_edit_model(model, url, format=c.format, dtype=torch.float16 if c.dtype == "float16" else None)
        return {"exported": url, "format": c.format}
