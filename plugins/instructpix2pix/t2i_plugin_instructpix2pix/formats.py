"""Writing an InstructPix2Pix model: a diffusers ``StableDiffusionInstructPix2PixPipeline`` folder
or one CompVis-layout single file (what timbrooks' and A1111's files hold, without EMA keys).

Reading needs nothing of its own: the SD plugin's formats read diffusers folders, single files
(``.safetensors`` and weights-only ``.ckpt``, Lightning's ``state_dict`` unwrapped) and ``.nemo``;
the UNet's width comes from ``conv_in.weight`` / ``input_blocks.0.0.weight``, and a file's
``model_ema.*`` copy is chosen by :func:`~t2i_plugin_instructpix2pix.ema.choose_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = ["PIPELINE_CLASS", "save_edit_model"]

PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"


def save_edit_model(model: Any, url: str, *, format: Literal["diffusers", "single-file"] | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Export an 8-channel SD bundle (EMA weights already chosen) to ``url``: a diffusers folder
    whose ``model_index.json`` names ``StableDiffusionInstructPix2PixPipeline`` (the default), or
    a single safetensors file in the CompVis layout with its ``.yaml``."""
    from t2i_plugin_instructpix2pix.edit import check_edit_model

    check_edit_model(model)
    model.save(url, format=format or "diffusers", dtype=dtype)
    if (format or "diffusers") == "diffusers" and "://" not in url:
        index = Path(url) / "model_index.json"
        data = json.loads(index.read_text())
        index.write_text(json.dumps({**data, "_class_name": PIPELINE_CLASS}, indent=2))
