"""Hook implementations of the ControlNet plugin (entry point ``controlnet``)."""

from __future__ import annotations

from typing import Any

from t2i_sdk import hookimpl


@hookimpl
def register_conditioners() -> dict[str, Any]:
    """``controlnet``: a hint image turned into residuals for the UNet's skips and middle block."""
    from t2i_plugin_controlnet.conditioner import ControlNetConditioner

    return {"controlnet": ControlNetConditioner}


@hookimpl
def register_tasks() -> dict[str, Any]:
    """``controlnet-train`` (train a ControlNet on paired data), ``controlnet-eval`` (the shapes
    demo's adherence: IoU of the drawn shape with the hint, colour and shape accuracy) and
    ``controlnet-convert`` (any ControlNet format to diffusers or v1.1)."""
    from t2i_plugin_controlnet.convert_task import ControlNetConvertTask
    from t2i_plugin_controlnet.eval_task import ControlNetEvalTask
    from t2i_plugin_controlnet.train_task import ControlNetTrainTask

    return {"controlnet-train": ControlNetTrainTask, "controlnet-eval": ControlNetEvalTask,
            "controlnet-convert": ControlNetConvertTask}


@hookimpl
def register_datasets() -> dict[str, Any]:
    """``controlnet-pairs`` (fill50k's prompt.json layout) and ``controlnet-shapes`` (procedural
    shapes with their mask or outline as the hint)."""
    from t2i_plugin_controlnet.data import PromptJsonPairs, ShapeHints

    return {"controlnet-pairs": PromptJsonPairs, "controlnet-shapes": ShapeHints}
