"""t2i-sdk: what a plugin author imports (and all they need to import).

Everything named in ``__all__`` is stable API (docs/plugins.md lists it): the contracts, the
``hookimpl`` marker, config field helpers, the engine's error types, generation (``generate``,
``seeded_noise``, ``GuidanceConfig``), serve generators (``Generator``, ``GenerationRequest``,
``Upload``, ``Draft``, ``Resident``), image helpers (``load_image``, ``to_pil``, ``from_pil``,
``save_png``), the conditioning helpers, and :mod:`t2i_sdk.testing` (a conformance kit).

A plugin is a module with hook implementations, declared in its distribution's metadata::

    [project.entry-points."t2i_engine.plugins"]
    myplugin = "t2i_plugin_myplugin.plugin"
"""

from t2i_engine.conditioning.build import build_conditioners
from t2i_engine.conditioning.inputs import load_image
from t2i_engine.conditioning.shapes import unet_residual_shapes
from t2i_engine.config.fields import existing_path, option
from t2i_engine.diffusion.grids import SamplingPlan, default_plan
from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.errors import CheckpointError, ConfigError, DataError, PluginError, T2IError
from t2i_engine.hookspecs import ENTRY_POINT_GROUP, hookimpl
from t2i_engine.interfaces import (
    Autoencoder,
    Branch,
    ConditionInputs,
    Conditioner,
    Conditioning,
    Denoiser,
    DenoiserNet,
    LatentDiffusionModel,
    NoiseSchedule,
    Prediction,
    Residuals,
    RunContext,
    Sampler,
    StepCallback,
    Task,
    TextEmbedding,
    TextEncoder,
    missing_members,
)
from t2i_engine.pipeline import generate, seeded_noise
from t2i_engine.serve.config import GenerationRequest
from t2i_engine.serve.generators import Draft, Generator, Resident, Upload
from t2i_engine.utils.images import from_pil, save_png, to_pil

__all__ = [
    "ENTRY_POINT_GROUP",
    "Autoencoder",
    "Branch",
    "CheckpointError",
    "ConditionInputs",
    "Conditioner",
    "Conditioning",
    "ConfigError",
    "DataError",
    "Denoiser",
    "DenoiserNet",
    "Draft",
    "GenerationRequest",
    "Generator",
    "GuidanceConfig",
    "LatentDiffusionModel",
    "NoiseSchedule",
    "PluginError",
    "Prediction",
    "Residuals",
    "Resident",
    "RunContext",
    "Sampler",
    "SamplingPlan",
    "StepCallback",
    "T2IError",
    "Task",
    "TextEmbedding",
    "TextEncoder",
    "Upload",
    "build_conditioners",
    "default_plan",
    "existing_path",
    "from_pil",
    "generate",
    "hookimpl",
    "load_image",
    "missing_members",
    "option",
    "save_png",
    "seeded_noise",
    "to_pil",
    "unet_residual_shapes",
]
