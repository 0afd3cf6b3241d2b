"""The conditioner example: plugin module and test."""

PLUGIN = '''"""The $name plugin: a conditioner that brightens or darkens images by a hint image.

``[[conditioners]] type = "$name"`` with ``inputs = { hint = "hint.png" }``: the hint's mean
brightness, times ``strength``, is added to the UNet's middle block (a residual, as ControlNet's
are). The core applies ``scale``, ``start``/``end`` and ``branch``; this file only says what to add.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from t2i_sdk import (ConditionInputs, Conditioning, LatentDiffusionModel, Residuals, hookimpl, option,
                     unet_residual_shapes)


def _nonzero(instance: Any, attribute: Any, value: float) -> None:
    if value == 0:
        raise ValueError("must not be 0 (use the entry's scale = 0 to switch the conditioner off)")


class Brightness:
    """Adds ``strength * (mean brightness of the hint + 1)`` to the UNet's middle block."""

    @attrs.frozen
    class Config:
        strength: float = option(default=2.0, validator=_nonzero, help="residual per unit of hint brightness")

    def __init__(self, config: Config) -> None:
        self.config = config
        self.unet: Any = None

    def setup(self, model: LatentDiffusionModel) -> None:
        """Called once per run: keep the UNet, whose shape the residual must match."""
        self.unet = model.denoiser

    def condition(self, cond: Conditioning, inputs: ConditionInputs) -> Conditioning:
        """Once per generation: the hint's brightness in [0, 2] per image (1 without a hint)."""
        if "hint" in inputs.images:
            level = inputs.images["hint"].mean(dim=(1, 2, 3)) + 1.0  # (B,)
        else:
            level = torch.ones(inputs.batch_size, device=inputs.device)
        return cond.with_extras(${module}_level=level.to(inputs.dtype))

    def residuals(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Residuals:
        """At every step in the window: the middle-block residual."""
        _, (channels, h, w) = unet_residual_shapes(self.unet, *x_t.shape[-2:])
        level = cond.extras["${module}_level"].view(-1, 1, 1, 1) * self.config.strength
        return Residuals(mid=level.expand(-1, channels, h, w).to(x_t.dtype))


@hookimpl
def register_conditioners() -> Mapping[str, Any]:
    return {"$name": Brightness}
'''

TEST = '''import torch
from t2i_sdk.testing import check_conditioner, check_plugin

import t2i_plugin_${module}.plugin as plugin


def test_registers() -> None:
    assert check_plugin(plugin, name="$name") == {"conditioner": ["$name"]}


def test_behaves_as_a_conditioner() -> None:
    hint = torch.rand(1, 3, 64, 64) * 2 - 1
    check_conditioner(plugin, "$name", options={"strength": 1.5}, images={"hint": hint})
    check_conditioner(plugin, "$name", options={"branch": "cond"})  # guidance's conditional branch only
'''
