"""Tasks that ship with the core: ``preview-data`` (no model), and ``sample``, ``sample-grid``,
``train``, ``precache`` and ``shapes-eval``, which drive any model implementing
:class:`~t2i_engine.interfaces.LatentDiffusionModel`."""

from t2i_engine.serve.task import ServeTask
from t2i_engine.tasks.grid import SampleGridTask
from t2i_engine.tasks.precache import PrecacheTask
from t2i_engine.tasks.preview import PreviewData
from t2i_engine.tasks.sample import SampleTask
from t2i_engine.tasks.shapes_eval import ShapesEvalTask
from t2i_engine.tasks.train import TrainTask

TASKS = {"preview-data": PreviewData, "sample": SampleTask, "sample-grid": SampleGridTask,
         "train": TrainTask, "precache": PrecacheTask, "shapes-eval": ShapesEvalTask, "serve": ServeTask}

__all__ = ["TASKS", "PrecacheTask", "PreviewData", "SampleGridTask", "SampleTask", "ServeTask",
           "ShapesEvalTask", "TrainTask"]
