"""The core's dataset types, ``name -> factory`` (each factory declares its ``Config``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from t2i_engine.data.imagefolder import ImageFolderDataset
from t2i_engine.data.precache import PrecachedDataset
from t2i_engine.data.shapes import ShapesDataset
from t2i_engine.data.webdataset import WebDatasetShards

DATASETS: dict[str, Callable[..., Any]] = {
    "shapes": ShapesDataset,
    "imagefolder": ImageFolderDataset,
    "webdataset": WebDatasetShards,
    "precached": PrecachedDataset,
}
"""Registered by :mod:`t2i_engine.builtins` through ``register_datasets``."""
