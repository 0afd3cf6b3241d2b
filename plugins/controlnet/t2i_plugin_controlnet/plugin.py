"""Hook implementations of the ControlNet plugin (entry point ``controlnet``)."""

from __future__ import annotations

from typing import Any

from t2i_sdk import hookimpl


@hookimpl
def register_conditioners() -> dict[str, Any]:
    """``controlnet``: a hint image turned into residuals for the UNet's skips and middle block."""
    from t2i_plugin_controlnet.conditioner import ControlNetConditioner

    return {"controlnet": ControlNetConditioner}
