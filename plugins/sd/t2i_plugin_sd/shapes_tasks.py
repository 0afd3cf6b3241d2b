"""The shapes-model tasks (``shapes-train``, ``shapes-eval``, ``sample-grid``) as one mapping that
the plugin's ``register_tasks`` merges in."""

from __future__ import annotations

from typing import Any

from t2i_plugin_sd.shapes_train import ShapesTrainTask

SHAPES_TASKS: dict[str, Any] = {"shapes-train": ShapesTrainTask}
"""name -> task factory."""
