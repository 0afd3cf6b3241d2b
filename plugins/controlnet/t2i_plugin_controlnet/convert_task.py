"""``controlnet-convert``: read a ControlNet in any format the plugin reads and write it as a
diffusers ``ControlNetModel`` folder or an lllyasviel v1.1 file.

::

    [task]
    name = "controlnet-convert"
    controlnet = "control_sd15_canny.pth"     # diffusers folder, v1.0/v1.1/difference file or .nemo
    output = "controlnet-canny"               # relative: inside engine.output_dir
    format = "diffusers"                      # or "v1.1"
    [model]                                   # the base model: original-layout files take its architecture
    type = "stable-diffusion"
    checkpoint = "stable-diffusion-v1-5"

A diffusers folder needs no ``[model]``; the other formats do (and a difference file its weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch

from t2i_engine.config.fields import existing_path, option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext

__all__ = ["ControlNetConvertConfig", "ControlNetConvertTask"]


@attrs.frozen
class ControlNetConvertConfig:
    """``[task] name = "controlnet-convert"``."""

    controlnet: str = existing_path(help="the ControlNet to read (diffusers folder, lllyasviel file, .nemo)")
    output: str = option(help="where to write it (relative: inside engine.output_dir)")
    format: Literal["diffusers", "v1.1"] = option(default="diffusers", help="diffusers folder or v1.1 single file")
    dtype: Literal["float32", "float16"] = option(default="float32", help="dtype of the written weights")


class ControlNetConvertTask:
    """Read one ControlNet, write it in another format."""

    Config = ControlNetConvertConfig

    def __init__(self, config: ControlNetConvertConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from pathlib import Path

        from t2i_engine.tasks.common import build_model, output_path
        from t2i_plugin_controlnet.export import save_controlnet
        from t2i_plugin_controlnet.formats import load_controlnet

        c = self.config
        base = None
        if ctx.config.model is not None:
            base = build_model(ctx, task="controlnet-convert").denoiser
        elif not Path(c.controlnet).is_dir():
            raise ConfigError("model: an original-layout or NeMo ControlNet takes its architecture from the base "
                              "model; give the [model] it was made for")
        loaded = load_controlnet(c.controlnet, base=base)
        url = output_path(ctx, c.output)
        save_controlnet(loaded, url, format=c.format, dtype=torch.float16 if c.dtype == "float16" else None)
        return {"written": url, "format": c.format}
