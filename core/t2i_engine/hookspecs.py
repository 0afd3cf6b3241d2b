"""Every hook the engine calls, in one module.

A plugin is a module (found through the ``t2i_engine.plugins`` entry-point group) whose
functions are decorated with :data:`hookimpl` and named like the specs below.

Registration hooks return a mapping ``name -> factory``. A factory is a callable that builds the
component from its validated configuration: ``factory(config)`` where ``config`` is an instance
of the attrs class ``factory.Config`` when the factory declares one (its keys are then checked
like the core's own), or ``factory()`` when it declares none. Results from all plugins are merged
into one registry per kind; the same name from two plugins is an error naming both.

Lifecycle hooks observe a run; their return values are ignored unless stated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pluggy

PROJECT_NAME = "t2i_engine"
ENTRY_POINT_GROUP = "t2i_engine.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Factory = Callable[..., Any]
Registry = Mapping[str, Factory]


# --- registration -------------------------------------------------------------------------


@hookspec
def register_models() -> Registry:
    """Register model types (the ``[model] type`` key).

    Returns:
        ``name -> factory``; ``factory(config)`` returns the model bundle the plugin's tasks use
        (for Stable Diffusion: text encoder, autoencoder, UNet and schedule).

    Combining: the mappings of all plugins are merged; a name registered twice is an error.
    """


@hookspec
def register_text_encoders() -> Registry:
    """Register text encoders (:class:`~t2i_engine.interfaces.TextEncoder` factories).

    Combining: merged across plugins; a duplicate name is an error.
    """


@hookspec
def register_autoencoders() -> Registry:
    """Register autoencoders (:class:`~t2i_engine.interfaces.Autoencoder` factories).

    Combining: merged across plugins; a duplicate name is an error.
    """


@hookspec
def register_samplers() -> Registry:
    """Register samplers (the ``[sampler] name`` key).

    Returns:
        ``name -> factory``; ``factory(config)`` returns a :class:`~t2i_engine.interfaces.Sampler`
        bound to its options (eta, churn ...).

    Combining: merged across plugins; a duplicate name is an error.
    """


@hookspec
def register_schedules() -> Registry:
    """Register noise schedules (the ``[schedule] type`` key).

    Returns:
        ``name -> factory``; ``factory(config)`` returns a
        :class:`~t2i_engine.interfaces.NoiseSchedule`.

    Combining: merged across plugins; a duplicate name is an error.
    """


@hookspec
def register_conditioners() -> Registry:
    """Register conditioners (the ``type`` key of each ``[[conditioners]]`` table).

    Returns:
        ``name -> factory``; ``factory(config)`` (its ``Config`` validates the entry's own keys;
        the core keys ``scale``, ``start``, ``end``, ``branch``, ``inputs`` are the core's) returns a
        :class:`~t2i_engine.interfaces.Conditioner`: built once per run by the ``sample``,
        ``sample-grid`` and ``train`` tasks, then ``setup(model)``, ``condition(cond, inputs)`` per
        generation and ``residuals(x_t, t, cond)`` per network call (docs/writing-a-conditioner.md).

    Combining: merged across plugins; a duplicate name is an error.
    """


@hookspec
def register_tasks() -> Registry:
    """Register tasks (the ``[task] name`` key): sample, train, precache, evaluate, convert ...

    Returns:
        ``name -> factory``; ``factory(config)`` returns a :class:`~t2i_engine.interfaces.Task`.

    Combining: merged across plugins; a duplicate name is an error.
    """


@hookspec
def register_checkpoint_formats() -> Registry:
    """Register checkpoint formats (diffusers folders, single files, .nemo archives ...).

    Returns:
        ``name -> factory``; ``factory()`` returns an object with ``detect(path) -> bool`` and
        ``load(path, ...)``, as the plugin that defines the format documents.

    Combining: merged across plugins; a duplicate name is an error.
    """


@hookspec
def register_datasets() -> Registry:
    """Register dataset types (the ``[data] type`` key).

    Returns:
        ``name -> factory``; ``factory(config)`` returns an iterable or map-style dataset of
        sample dicts (``"image"``, ``"caption"``, ...).

    Combining: merged across plugins; a duplicate name is an error.
    """


@hookspec
def register_generators() -> Registry:
    """Register serve generators (``t2i-engine serve``: what makes one served image).

    Returns:
        ``name -> factory``; ``factory()`` returns a generator
        (:class:`~t2i_engine.serve.generators.Generator`: the request keys and uploads it takes,
        ``accepts(model)``, ``setup``, ``prepare`` and ``generate``). The server uses the one
        ``[task] generator`` names, else the one whose ``accepts(model)`` claims the served model,
        else the core's ``text-to-image`` (docs/serving.md).

    Combining: merged across plugins; a duplicate name is an error.
    """


# --- lifecycle ----------------------------------------------------------------------------


@hookspec
def on_run_start(task_name: str, config: Any) -> None:
    """Called once before a task runs, with the task name and the resolved ``RunConfig``.

    Combining: every implementation is called; results are ignored.
    """


@hookspec
def on_run_end(task_name: str, summary: Mapping[str, Any]) -> None:
    """Called once after a task finished, with the summary the task returned.

    Combining: every implementation is called; results are ignored.
    """


@hookspec
def on_train_step_end(step: int, metrics: Mapping[str, float]) -> None:
    """Called after each optimizer step of the training loop with its logged scalars.

    Combining: every implementation is called; results are ignored.
    """


@hookspec
def on_checkpoint_saved(step: int, path: str) -> None:
    """Called after a checkpoint was written atomically, with its step and URL.

    Combining: every implementation is called; results are ignored.
    """


@hookspec
def on_sample_step(step: int, total: int, sigma: float) -> None:
    """Called after each sampler step of a sampling task.

    Combining: every implementation is called; results are ignored.
    """


REGISTRATION_HOOKS: dict[str, str] = {
    "register_models": "model",
    "register_text_encoders": "text_encoder",
    "register_autoencoders": "autoencoder",
    "register_samplers": "sampler",
    "register_schedules": "schedule",
    "register_conditioners": "conditioner",
    "register_tasks": "task",
    "register_checkpoint_formats": "checkpoint_format",
    "register_datasets": "dataset",
    "register_generators": "generator",
}
"""Registration hook name -> the component kind it fills."""

LIFECYCLE_HOOKS: tuple[str, ...] = (
    "on_run_start",
    "on_run_end",
    "on_train_step_end",
    "on_checkpoint_saved",
    "on_sample_step",
)
