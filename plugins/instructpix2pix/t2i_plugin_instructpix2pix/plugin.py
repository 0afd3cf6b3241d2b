"""Hook implementations of the InstructPix2Pix plugin (entry point ``instructpix2pix``)."""

from __future__ import annotations

from typing import Any

from t2i_sdk import hookimpl


@hookimpl
def register_tasks() -> dict[str, Any]:
    """``edit``: source images edited by instructions with an 8-channel SD model."""
    from t2i_plugin_instructpix2pix.task import EditTask

    return {"edit": EditTask}
