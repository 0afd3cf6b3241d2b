"""The model example: plugin module and test."""

PLUGIN = '''"""The $name plugin: a model bundle (text encoder, autoencoder, denoiser, schedule).

This example assembles the SDK's tiny random parts (``t2i_sdk.toy_model``); a real model plugin
builds its own networks and loads its weights strictly in the factory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from t2i_sdk import hookimpl, option
from t2i_sdk.toy_model import ToyModel


class TinyModel(ToyModel):
    """A random model bundle; ``seed`` draws its weights."""

    @attrs.frozen
    class Config:
        seed: int = option(default=0, help="seed of the random weights")

    def __init__(self, config: Config) -> None:
        super().__init__(seed=config.seed)
        self.description = "$name (random weights)"


@hookimpl
def register_models() -> Mapping[str, Any]:
    return {"$name": TinyModel}
'''

TEST = '''import torch
from t2i_sdk import GuidanceConfig, LatentDiffusionModel, generate, missing_members, seeded_noise
from t2i_sdk.testing import check_plugin

import t2i_plugin_${module}.plugin as plugin


def test_registers() -> None:
    assert check_plugin(plugin, name="$name") == {"model": ["$name"]}


def test_generates_images_with_the_core_pipeline() -> None:
    from t2i_engine.diffusion.registry import SAMPLERS, DDIMConfig

    model = plugin.TinyModel(plugin.TinyModel.Config(seed=1))
    assert missing_members(model, LatentDiffusionModel) == []
    noise = seeded_noise([0, 1], (model.autoencoder.latent_channels, 4, 4))
    images = generate(model, ["a", "b"], noise, sampler=SAMPLERS["ddim"](DDIMConfig(steps=2)),
                      guidance=GuidanceConfig(guidance_scale=2.0))
    assert images.shape == (2, 3, 32, 32) and bool(images.isfinite().all())
'''
