"""generate() with a conditioner chain: the step window follows the sampler's steps (counted from its
callback, so multi-evaluation samplers and img2img count right), and the train task refuses a model
that cannot take conditioners."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from t2i_engine.conditioning import in_window
from t2i_engine.diffusion.registry import SAMPLERS, ChurnConfig, DDIMConfig
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import Residuals
from t2i_engine.pipeline import generate, seeded_noise
from t2i_sdk import GuidanceConfig, unet_residual_shapes
from t2i_sdk.toy_model import tiny_model

from .toys import chain


class StepRecorder:
    """A zero mid residual that records the step of every network call it acts on."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.chain: Any = None

    def setup(self, model: Any) -> None:
        self.unet = model.denoiser

    def residuals(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> Residuals:
        self.steps.append(self.chain.clock.step)
        _, mid = unet_residual_shapes(self.unet, *x_t.shape[-2:])
        return Residuals(mid=torch.zeros(x_t.shape[0], *mid))


@pytest.mark.parametrize(("sampler", "evals_per_step"), [(SAMPLERS["ddim"](DDIMConfig(steps=10)), 1),
                                                         (SAMPLERS["heun"](ChurnConfig(steps=5)), 2)])
@pytest.mark.parametrize("strength", [None, 0.6])
def test_the_window_counts_the_steps_the_sampler_runs(sampler: Any, evals_per_step: int, strength: float | None) -> None:
    model = tiny_model()
    recorder = StepRecorder()
    ch = chain((recorder, {"start": 0.2, "end": 0.7}))
    recorder.chain = ch
    recorder.setup(model)
    steps: list[int] = []
    init = None if strength is None else torch.zeros(2, 3, 32, 32)
    generate(model, ["a", "b"], seeded_noise([0, 1], (4, 4, 4)), sampler=sampler, guidance=GuidanceConfig(guidance_scale=2.0),
             conditioners=ch, init_images=init, strength=strength or 0.8,
             callback=lambda info: steps.append(int(info["i"])))
    n = len(steps)
    expected = [i for i in range(n) if in_window(i, n, start=0.2, end=0.7)]
    acted = sorted(set(recorder.steps))
    assert acted == expected
    # Heun's last step to sigma 0 is Euler's (one evaluation)
    assert len(recorder.steps) >= len(expected) and len(recorder.steps) <= evals_per_step * len(expected)
    assert ch.clock.total is None  # stopped after the run: training and direct calls see an open window


def test_the_train_task_refuses_conditioners_a_model_cannot_take() -> None:
    from t2i_engine.tasks.train import conditioner_kwargs

    config = types.SimpleNamespace(conditioners=[types.SimpleNamespace(name="x", plugin="p")],
                                   model=types.SimpleNamespace(name="toy"))
    built = types.SimpleNamespace(residuals=lambda *a: None)
    plugins = types.SimpleNamespace(build=lambda component: built)
    ctx = types.SimpleNamespace(config=config, plugins=plugins, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"model 'toy' cannot train with \[\[conditioners\]\]"):
        conditioner_kwargs(ctx, tiny_model())  # type: ignore[arg-type]
