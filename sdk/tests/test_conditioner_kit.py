"""The conformance kit checks a conditioner's behaviour and names what is wrong."""

from __future__ import annotations

import types
from typing import Any

import attrs
import pytest
import torch

import t2i_sdk
from t2i_sdk.testing import check_conditioner


def _module(**conditioners: Any) -> types.ModuleType:
    module = types.ModuleType("kit_plugin")
    module.register_conditioners = t2i_sdk.hookimpl(lambda: conditioners)  # type: ignore[attr-defined]
    return module


class MidShift:
    """A good conditioner: a mid residual of ``value`` times the hint's mean brightness + 1."""

    @attrs.frozen
    class Config:
        value: float = t2i_sdk.option(default=1.0, help="residual size")

    def __init__(self, config: Config) -> None:
        self.config = config

    def setup(self, model: Any) -> None:
        self.unet = model.denoiser

    def condition(self, cond: t2i_sdk.Conditioning, inputs: t2i_sdk.ConditionInputs) -> t2i_sdk.Conditioning:
        hint = inputs.images.get("hint", torch.zeros(inputs.batch_size, 3, 1, 1))
        return cond.with_extras(mid_shift=hint.mean(dim=(1, 2, 3)) + 1.0)

    def residuals(self, x_t: torch.Tensor, t: torch.Tensor, cond: t2i_sdk.Conditioning) -> t2i_sdk.Residuals:
        _, (c, h, w) = t2i_sdk.unet_residual_shapes(self.unet, *x_t.shape[-2:])
        level = cond.extras["mid_shift"].view(-1, 1, 1, 1) * self.config.value
        return t2i_sdk.Residuals(mid=level.expand(-1, c, h, w).to(x_t.dtype))


def test_a_good_conditioner_passes() -> None:
    check_conditioner(_module(shift=MidShift), "shift", options={"value": 2.0},
                      images={"hint": torch.rand(1, 3, 64, 64) * 2 - 1})
    check_conditioner(_module(shift=MidShift), "shift", options={"branch": "cond"})


def test_a_conditioner_with_neither_method_is_rejected() -> None:
    class Nothing:
        def __init__(self) -> None:
            pass

    with pytest.raises(AssertionError, match="implements neither condition\\(\\) nor residuals\\(\\)"):
        check_conditioner(_module(nothing=Nothing), "nothing")


def test_a_conditioner_that_does_nothing_is_rejected() -> None:
    class Idle:
        def condition(self, cond: Any, inputs: Any) -> Any:
            return cond

    with pytest.raises(AssertionError, match="at scale 1.0 it does not change the denoiser output"):
        check_conditioner(_module(idle=Idle), "idle")


def test_a_conditioner_that_mixes_rows_is_rejected() -> None:
    class Mixer(MidShift):
        def residuals(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> Any:
            res = super().residuals(x_t, t, cond)
            return t2i_sdk.Residuals(mid=res.mid * x_t.shape[0])  # depends on the batch size

    with pytest.raises(AssertionError, match="a row differs from the same row alone"):
        check_conditioner(_module(mix=Mixer), "mix")


def test_a_config_that_does_not_round_trip_is_rejected() -> None:
    class Lossy(MidShift):
        @attrs.frozen
        class Config:
            value: float = attrs.field(default=1.0, converter=lambda v: float(v) + 1.0)  # not idempotent

    with pytest.raises(AssertionError, match="does not round-trip through `t2i-engine config`"):
        check_conditioner(_module(lossy=Lossy), "lossy", options={"value": 2.0})


def test_a_config_that_does_not_load_is_reported() -> None:
    with pytest.raises(AssertionError, match=r"its config does not load: conditioners\[0\]\.valu: unknown key"):
        check_conditioner(_module(shift=MidShift), "shift", options={"valu": 2.0})


def test_a_conditioner_acting_behind_the_cores_back_is_rejected() -> None:
    class Hooked(MidShift):
        """Changes the UNet itself in setup (a forward hook): scale and window cannot reach it."""

        def setup(self, model: Any) -> None:
            super().setup(model)
            model.denoiser.conv_out.register_forward_hook(lambda m, i, o: o + 1.0)

    with pytest.raises(AssertionError, match="at scale 0 the denoiser output is not exactly the unconditioned one"):
        check_conditioner(_module(hooked=Hooked), "hooked")
