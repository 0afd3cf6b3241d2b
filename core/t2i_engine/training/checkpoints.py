"""Training checkpoints: a folder per step, a ``latest`` pointer, the last K kept.

Layout under ``<checkpoint_dir>`` (any fsspec URL)::

    step-000000300/model.safetensors   full model state_dict (strictly loaded back)
    step-000000300/ema.safetensors     EMA shadow of the trainable weights (when EMA is on)
    step-000000300/state.pt            optimizer, LR scheduler, RNG states, step, data position
    latest                             text: the name of the newest complete checkpoint

Under ``strategy = "fsdp"`` a checkpoint folder holds ``fabric.ckpt`` instead of the
safetensors files: the full (unsharded) model and optimizer state and the scheduler, written and
read back by Fabric's own ``fabric.save`` / ``fabric.load`` (its full-state-dict path), beside
``state.pt`` (:mod:`t2i_engine.training.fsdp`).

A checkpoint's files are written into a hidden staging folder (``.step-000000300.partial-<id>``)
that is renamed to ``step-...`` only once all of them exist, and ``latest`` is rewritten
(atomically) after that, so a crash at any moment leaves the previous checkpoint complete and
marked latest, and never a ``step-...`` folder with missing files. A save that fails (disk
full, read-only, no permission) removes its staging folder and raises
:class:`~t2i_engine.errors.StorageError`; pruning also removes staging folders a killed run left. ``state.pt`` holds only plain containers and tensors and is read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

from t2i_engine.checkpoint.io import (
    atomic_write_bytes,
    load_safetensors,
    read_bytes,
    safe_torch_load,
    save_safetensors,
    save_torch,
)
from t2i_engine.errors import CheckpointError, StorageError, storage_error

__all__ = ["CheckpointPaths", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "prune_checkpoints", "publish", "save_checkpoint", "staging_paths"]

_STEP_RE = re.compile(r"^step-(\d{9})$")
_PARTIAL = ".partial-"
LATEST = "latest"


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


class CheckpointPaths:
    """The URLs of one checkpoint's files."""

    def __init__(self, checkpoint_dir: str, step: int, *, folder: str | None = None) -> None:
        self.name = f"step-{step:09d}"
        self.dir = _join(checkpoint_dir, folder or self.name)
        self.model = _join(self.dir, "model.safetensors")
        self.ema = _join(self.dir, "ema.safetensors")
        self.state = _join(self.dir, "state.pt")
        self.fabric = _join(self.dir, "fabric.ckpt")  # FSDP runs: Fabric's full-state file


def staging_paths(checkpoint_dir: str, step: int) -> CheckpointPaths:
    """A fresh hidden folder to write the checkpoint of ``step`` into before :func:`publish`."""
    name = CheckpointPaths(checkpoint_dir, step).name
    return CheckpointPaths(checkpoint_dir, step, folder=f".{name}{_PARTIAL}{uuid.uuid4().hex[:12]}")


def save_checkpoint(checkpoint_dir: str, step: int, *, model_state: dict[str, Tensor],
                    ema_state: dict[str, Tensor] | None, train_state: dict[str, Any],
                    keep_last: int) -> str:
    """Write one checkpoint, point ``latest`` at it, prune to ``keep_last``; return its folder."""
    staged = staging_paths(checkpoint_dir, step)
    meta = {"step": str(step), "format": "t2i-engine-train-checkpoint-1"}

    def write() -> None:
        save_safetensors(model_state, staged.model, metadata=meta)
        if ema_state is not None:
            save_safetensors(ema_state, staged.ema, metadata=meta)
        save_torch(train_state, staged.state)

    return publish(checkpoint_dir, step, staged, keep_last=keep_last, write=write)


def publish(checkpoint_dir: str, step: int, staged: CheckpointPaths, *, keep_last: int,
            write: Callable[[], None] = lambda: None) -> str:
    """Run ``write`` (which fills ``staged``), rename the staging folder to ``step-...``, point
    ``latest`` at it and prune; on a filesystem fault remove the staging folder and raise
    StorageError. Returns the checkpoint's folder."""
    final = CheckpointPaths(checkpoint_dir, step)
    fs, _ = fsspec.core.url_to_fs(checkpoint_dir)
    try:
        write()
        _move_into_place(fs, _path(staged.dir), _path(final.dir))
    except (OSError, StorageError) as exc:
        with contextlib.suppress(Exception):
            fs.rm(_path(staged.dir), recursive=True)
        cause = exc if isinstance(exc, StorageError) else storage_error("write", final.dir, exc)
        raise StorageError(f"checkpoint of step {step} not saved ({cause}); the previous complete "
                           f"checkpoint in {checkpoint_dir} is still the one marked latest") from exc
    atomic_write_bytes(_join(checkpoint_dir, LATEST), final.name.encode())
    prune_checkpoints(checkpoint_dir, keep_last=keep_last)
    return final.dir


def _path(url: str) -> str:
    return fsspec.core.url_to_fs(url)[1]


def _move_into_place(fs: Any, staged: str, final: str) -> None:
    """Rename the complete staging folder to its step name; a folder already there (left by an
    earlier run that trained past this step without ``latest`` reaching it) is replaced."""
    if fs.exists(final):
        fs.rm(final, recursive=True)
    if isinstance(fs, LocalFileSystem):
        os.replace(staged, final)  # one atomic rename of the whole folder
    else:
        fs.mv(staged, final, recursive=True)


def list_checkpoints(checkpoint_dir: str) -> list[int]:
    """Steps of the checkpoint folders present (complete or not), ascending."""
    fs, path = fsspec.core.url_to_fs(checkpoint_dir)
    if not fs.exists(path):
        return []
    steps = []
    for entry in fs.ls(path, detail=False):
        m = _STEP_RE.match(entry.rstrip("/").rpartition("/")[2])
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(checkpoint_dir: str) -> int | None:
    """The step of the checkpoint ``latest`` points at, or None when there is none yet."""
    fs, path = fsspec.core.url_to_fs(checkpoint_dir)
    if not fs.exists(_join(path, LATEST)):
        return None
    name = read_bytes(_join(checkpoint_dir, LATEST)).decode().strip()
    m = _STEP_RE.match(name)
    if not m:
        raise CheckpointError(f"{_join(checkpoint_dir, LATEST)} holds {name!r}, not a checkpoint name")
    return int(m.group(1))


def prune_checkpoints(checkpoint_dir: str, *, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints up to ``latest`` (never ``latest``),
    and any incomplete folder left by a crash."""
    latest = latest_checkpoint(checkpoint_dir)
    if latest is None:
        return
    fs, _ = fsspec.core.url_to_fs(checkpoint_dir)
    steps = list_checkpoints(checkpoint_dir)
    kept = [s for s in steps if s <= latest][-keep_last:]
    for s in steps:
        if s not in kept and s < latest:
            fs.rm(fsspec.core.url_to_fs(CheckpointPaths(checkpoint_dir, s).dir)[1], recursive=True)
    for entry in fs.ls(_path(checkpoint_dir), detail=False):  # staging folders of killed saves
        if _PARTIAL in entry.rstrip("/").rpartition("/")[2]:
            fs.rm(entry, recursive=True)


def load_checkpoint(checkpoint_dir: str, step: int, *,
                    with_ema: bool) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, Any]]:
    """Read the checkpoint of ``step``: ``(model_state, ema_state or None, train_state)``."""
    paths = CheckpointPaths(checkpoint_dir, step)
    model_state = load_safetensors(paths.model)
    ema_state = load_safetensors(paths.ema) if with_ema else None
    train_state = safe_torch_load(paths.state)
    if not isinstance(train_state, dict) or train_state.get("step") != step:
        raise CheckpointError(f"{paths.state} does not describe step {step}")
    return model_state, ema_state, train_state
