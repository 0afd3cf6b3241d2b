"""Hook implementations of the InstructPix2Pix plugin (entry point ``instructpix2pix``)."""

from __future__ import annotations

from typing import Any

from t2i_sdk import hookimpl


@hookimpl
def register_tasks() -> dict[str, Any]:
    """``edit``: source images edited by instructions with an 8-channel SD model;
    ``edit-train``: train one from any SD checkpoint on edit triplets;
    ``edit-shapes-eval``: the shapes demo's edit success and preservation;
    ``edit-export``: a checkpoint (timbrooks .ckpt, A1111 file, ...) to a diffusers folder or single file."""
    from t2i_plugin_instructpix2pix.export_task import EditExportTask
    from t2i_plugin_instructpix2pix.shapes_eval import EditShapesEvalTask
    from t2i_plugin_instructpix2pix.task import EditTask
    from t2i_plugin_instructpix2pix.train_task import EditTrainTask

    return {"edit": EditTask, "edit-train": EditTrainTask, "edit-shapes-eval": EditShapesEvalTask,
            "edit-export": EditExportTask}


@hookimpl
def register_datasets() -> dict[str, Any]:
    """Edit triplets: ``ip2p-folder`` (the reference's seeds.json layout), ``ip2p-webdataset``
    (input/edit/output columns in tar shards) and ``shapes-edit`` (procedural, the demo's)."""
    from t2i_plugin_instructpix2pix.datasets import EditFolderDataset, EditWebDataset
    from t2i_plugin_instructpix2pix.shapes_edit import ShapesEditDataset

    return {"ip2p-folder": EditFolderDataset, "ip2p-webdataset": EditWebDataset, "shapes-edit": ShapesEditDataset}


@hookimpl
def register_generators() -> dict[str, Any]:
    """``edit``: ``t2i-engine serve`` of an 8-channel editor (a ``source`` upload, s_T and s_I)."""
    from t2i_plugin_instructpix2pix.serving import EditGenerator

    return {"edit": EditGenerator}
