"""The core's own plugin: built-in samplers, schedules, datasets, tasks and the serve generator.

It registers through the same hooks as any third-party plugin (see :mod:`t2i_engine.hookspecs`);
the imports sit inside the hooks so that importing the engine stays cheap.
"""

from __future__ import annotations

from t2i_engine.hookspecs import Registry, hookimpl


@hookimpl
def register_samplers() -> Registry:
    """DDPM, DDIM, PLMS, Euler (ancestral), Heun, DPM-Solver++, LMS, EDM (docs/samplers.md)."""
    from t2i_engine.diffusion.registry import SAMPLERS

    return SAMPLERS


@hookimpl
def register_schedules() -> Registry:
    """Discrete beta schedules and continuous EDM / VP log-SNR schedules."""
    from t2i_engine.diffusion.registry import SCHEDULES

    return SCHEDULES


@hookimpl
def register_datasets() -> Registry:
    """shapes, imagefolder, webdataset and precached datasets (docs/data.md)."""
    from t2i_engine.data.registry import DATASETS

    return DATASETS


@hookimpl
def register_tasks() -> Registry:
    """Model-free core tasks (``preview-data``)."""
    from t2i_engine.tasks import TASKS

    return TASKS


@hookimpl
def register_generators() -> Registry:
    """``text-to-image``: the serve worker's default (prompt to image as the ``sample`` task does)."""
    from t2i_engine.serve.generators import DEFAULT_GENERATOR, TextToImage

    return {DEFAULT_GENERATOR: TextToImage}
