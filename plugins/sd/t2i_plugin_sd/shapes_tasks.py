"""The shapes-model training task (``shapes-train``) as a mapping that the plugin's
``register_tasks`` merges in. (``sample-grid`` and ``shapes-eval`` are model-agnostic core tasks.)"""

from __future__ import annotations

from typing import Any

from t2i_plugin_sd.shapes_train import ShapesTrainTask

SHAPES_TASKS: dict[str, Any] = {"shapes-train": ShapesTrainTask}
"""name -> task factory."""
