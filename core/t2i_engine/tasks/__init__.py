"""Tasks that ship with the core: ``preview-data`` (no model), and ``sample``, ``train`` and
``precache``, which drive any model implementing
:class:`~t2i_engine.interfaces.LatentDiffusionModel`."""

from t2i_engine.tasks.precache import PrecacheTask
from t2i_engine.tasks.preview import PreviewData
from t2i_engine.tasks.sample import SampleTask
from t2i_engine.tasks.train import TrainTask

TASKS = {"preview-data": PreviewData, "sample": SampleTask, "train": TrainTask, "precache": PrecacheTask}

__all__ = ["TASKS", "PrecacheTask", "PreviewData", "SampleTask", "TrainTask"]
