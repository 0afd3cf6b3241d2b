"""t2i-sdk: what a plugin author imports.

Everything here is stable API: the contracts, the ``hookimpl`` marker, config field helpers,
the engine's error types, and :mod:`t2i_sdk.testing` (a conformance kit for plugins).

A plugin is a module with hook implementations, declared in its distribution's metadata::

    [project.entry-points."t2i_engine.plugins"]
    myplugin = "t2i_plugin_myplugin.plugin"
"""

from t2i_engine.config.fields import existing_path, option
from t2i_engine.errors import CheckpointError, ConfigError, DataError, PluginError, T2IError
from t2i_engine.hookspecs import ENTRY_POINT_GROUP, hookimpl
from t2i_engine.interfaces import (
    Autoencoder,
    Conditioner,
    Conditioning,
    Denoiser,
    DenoiserNet,
    LatentDiffusionModel,
    NoiseSchedule,
    Prediction,
    RunContext,
    Sampler,
    StepCallback,
    Task,
    TextEmbedding,
    TextEncoder,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Autoencoder",
    "CheckpointError",
    "Conditioner",
    "Conditioning",
    "ConfigError",
    "DataError",
    "Denoiser",
    "DenoiserNet",
    "LatentDiffusionModel",
    "NoiseSchedule",
    "PluginError",
    "Prediction",
    "RunContext",
    "Sampler",
    "StepCallback",
    "T2IError",
    "Task",
    "TextEmbedding",
    "TextEncoder",
    "existing_path",
    "hookimpl",
    "option",
]
