"""The shapes-model tasks (``shapes-train``, ``shapes-eval``, ``sample-grid``) as one mapping that
the plugin's ``register_tasks`` merges in."""

from __future__ import annotations

from typing import Any

from t2i_plugin_sd.shapes_eval_tasks import SampleGridTask, ShapesEvalTask
from t2i_plugin_sd.shapes_train import ShapesTrainTask

SHAPES_TASKS: dict[str, Any] = {"shapes-train": ShapesTrainTask, "shapes-eval": ShapesEvalTask,
                                "sample-grid": SampleGridTask}
"""name -> task factory."""
