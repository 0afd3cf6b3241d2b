"""The sampler example: plugin module and test."""

PLUGIN = '''"""The $name plugin: a sampler (Euler's method on the probability-flow ODE, Karras et al. 2022,
algorithm 2 without churn)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from t2i_sdk import Denoiser, NoiseSchedule, SamplingPlan, StepCallback, default_plan, hookimpl, option


class Euler:
    """``x <- x + (sigma_next - sigma) * (x - D(x, sigma)) / sigma`` over the schedule's sigmas."""

    @attrs.frozen
    class Config:
        steps: int = option(default=20, validator=attrs.validators.ge(1), help="sampler steps")

    def __init__(self, config: Config) -> None:
        self.config = config

    def plan(self, schedule: NoiseSchedule) -> SamplingPlan:
        """The sigmas it walks: ``steps`` of the schedule's own spacing, then 0."""
        return default_plan(schedule, self.config.steps)

    def __call__(self, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None) -> torch.Tensor:
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = model(x, sigma.to(x.dtype).expand(x.shape[0]))
            x = x + (sigma_next - sigma).to(x.dtype) * (x - denoised) / sigma.to(x.dtype)
            if callback is not None:
                callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
        return x


@hookimpl
def register_samplers() -> Mapping[str, Any]:
    return {"$name": Euler}
'''

TEST = '''import torch
from t2i_sdk.testing import check_plugin

import t2i_plugin_${module}.plugin as plugin


def test_registers() -> None:
    assert check_plugin(plugin, name="$name") == {"sampler": ["$name"]}


def test_exact_on_a_point_mass() -> None:
    # data at 0: D(x, sigma) = 0 and the ODE solution is x * sigma_next / sigma, which Euler follows exactly
    sigmas = torch.tensor([10.0, 4.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8)
    out = plugin.Euler(plugin.Euler.Config(steps=3))(lambda x, s: torch.zeros_like(x), x * 10, sigmas)
    assert torch.equal(out, torch.zeros_like(x))
    half = plugin.Euler(plugin.Euler.Config(steps=1))(lambda x, s: torch.zeros_like(x), x * 10, sigmas[:3])
    torch.testing.assert_close(half, x * 1.0)
'''
