"""Model-free tasks that ship with the core."""

from t2i_engine.tasks.preview import PreviewData

TASKS = {"preview-data": PreviewData}

__all__ = ["TASKS", "PreviewData"]
