"""The [train] schema: defaults, validators, and the lead's loader structuring it."""

from __future__ import annotations

import pytest

from t2i_engine.config.structure import structure
from t2i_engine.errors import ConfigError
from t2i_engine.training.config import TrainConfig


@pytest.mark.parametrize("bad", [
    {"precision": "64-true"}, {"strategy": "deepspeed"}, {"devices": 0}, {"betas": [0.9, 0.99, 0.9]},
    {"betas": [1.5, 0.9]}, {"clip_grad_norm": 0.0}, {"lr_schedule": "linear"}, {"keep_last": 0},
    {"max_bad_sample_fraction": 1.5}, {"ema_decay": 1.1}, {"grad_accum": 0},
])
def test_invalid_values_are_rejected(bad):
    with pytest.raises((ValueError, TypeError)):
        TrainConfig(**bad)


def test_loader_structures_the_train_table_and_names_unknown_keys():
    cfg = structure(TrainConfig, {"precision": "bf16-mixed", "betas": [0.9, 0.95], "clip_grad_norm": 0.5,
                                  "sample_prompts": ["a red circle on a blue background"]}, "train")
    assert cfg.precision == "bf16-mixed" and cfg.betas == [0.9, 0.95] and cfg.max_steps == 1000
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        structure(TrainConfig, {"max_step": 3}, "train")
