"""Moved: the ``sample``, ``train`` and ``precache`` tasks are the core's own
(:mod:`t2i_engine.tasks`) and drive any :class:`~t2i_engine.interfaces.LatentDiffusionModel`,
Stable Diffusion included. These names stay importable for existing code."""

from t2i_engine.tasks.precache import PrecacheConfig, PrecacheTask
from t2i_engine.tasks.sample import SampleConfig, SampleTask
from t2i_engine.tasks.train import TrainTask, TrainTaskConfig

__all__ = ["PrecacheConfig", "PrecacheTask", "SampleConfig", "SampleTask", "TrainTask", "TrainTaskConfig"]
