"""Helpers shared by the core's model tasks (``sample``, ``train``, ``precache``)."""

from __future__ import annotations

from pathlib import Path

from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import LatentDiffusionModel, RunContext

__all__ = ["build_model", "output_path"]


def build_model(ctx: RunContext, *, task: str) -> LatentDiffusionModel:
    """The ``[model]`` of the run, moved to the run's device; a ConfigError when the table is
    missing or its type does not implement :class:`~t2i_engine.interfaces.LatentDiffusionModel`."""
    if ctx.config.model is None:
        raise ConfigError(f"model: task '{task}' needs a [model] table (e.g. type = \"stable-diffusion\")")
    model = ctx.plugins.build(ctx.config.model)
    if not isinstance(model, LatentDiffusionModel):
        raise ConfigError(f"model.type: '{ctx.config.model.name}' (from plugin '{ctx.config.model.plugin}') "
                          f"does not implement LatentDiffusionModel, which task '{task}' drives "
                          "(see docs/contracts.md)")
    return model.to(ctx.device)


def output_path(ctx: RunContext, path: str) -> str:
    """``path`` as given when absolute or a URL, else inside ``engine.output_dir``."""
    if "://" in path or Path(path).expanduser().is_absolute():
        return str(Path(path).expanduser()) if "://" not in path else path
    return str(Path(ctx.output_dir) / path)
