"""Run one validated job: pick the device, seed everything, build the task and call it."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from t2i_engine.config.schema import RunConfig
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext, Task
from t2i_engine.plugins.manager import EnginePluginManager


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"engine.device: not a device: {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"engine.device: {name!r} was asked for but no CUDA GPU is available")
    return device


def writable_output_dir(output_dir: Path) -> Path:
    """Create ``engine.output_dir`` and check that a file can be written there: a ConfigError
    now (a file in the way, read-only, no permission), not a failure after an hour of work."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"engine.output_dir: '{output_dir}' is a file; a folder is expected here")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # unique across machines: ranks of a multi-node job share this folder, and processes in
        # containers on different nodes often have the same pid
        probe = output_dir / f".t2i-write-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"engine.output_dir: cannot write to '{output_dir}': {exc.strerror or exc}") from exc
    return output_dir


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_config(config: RunConfig, pm: EnginePluginManager, *, debug: bool = False) -> Mapping[str, Any]:
    """Execute ``config``'s task and return its summary; lifecycle hooks observe the run."""
    device = resolve_device(config.engine.device)
    seed_everything(config.engine.seed)
    try:
        requested = config.output_dir
    except ValueError as exc:  # e.g. a NUL character, which no filesystem accepts in a path
        raise ConfigError(f"engine.output_dir: not a usable path: {exc}") from exc
    output_dir = writable_output_dir(requested)
    task = pm.build(config.task)
    if not isinstance(task, Task):
        raise ConfigError(f"task.name: '{config.task.name}' (from plugin '{config.task.plugin}') "
                          "did not build a Task (an object with run(ctx))")
    from t2i_engine.conditioning.build import refuse_conditioners

    refuse_conditioners(config, task)  # a task that cannot apply [[conditioners]] says so, never ignores them
    ctx = RunContext(config=config, plugins=pm, output_dir=output_dir, device=device,
                     seed=config.engine.seed, debug=debug)
    pm.hook.on_run_start(task_name=config.task.name, config=config)
    summary = dict(task.run(ctx) or {})
    pm.hook.on_run_end(task_name=config.task.name, summary=summary)
    return summary
