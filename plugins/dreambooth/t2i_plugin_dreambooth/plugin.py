"""Hook implementations of the DreamBooth plugin (entry point ``dreambooth``)."""

from __future__ import annotations

from typing import Any

from t2i_sdk import hookimpl


@hookimpl
def register_tasks() -> dict[str, Any]:
    """``dreambooth``: subject fine-tuning with prior preservation, LoRA or full, for any model bundle."""
    from t2i_plugin_dreambooth.task import DreamBoothTask

    return {"dreambooth": DreamBoothTask}
