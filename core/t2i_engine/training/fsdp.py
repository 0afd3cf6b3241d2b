"""``train.strategy = "fsdp"``: Lightning Fabric's FSDP with full-state checkpoints.

The model is sharded across the GPUs (each shared UNet block and text layer its own FSDP unit),
and checkpoints go through Fabric's own API: :func:`save_fsdp` calls ``fabric.save`` with the
strategy's full state-dict type, so rank 0 writes the whole (unsharded) model and optimizer to
``step-.../fabric.ckpt`` (the step, data position and RNG states go to ``state.pt`` as in every
checkpoint); :func:`load_fsdp` restores them with ``fabric.load``. The staging
folder, ``latest`` pointer and pruning are the same as every other checkpoint's
(:mod:`t2i_engine.training.checkpoints`).

FSDP needs CUDA: Fabric does not run it on the CPU, so :func:`check_fsdp` refuses it there with
a message, before anything is built. The EMA, sample grids and the in-loop export need the
unsharded weights in one process and are refused with FSDP too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from torch import nn

from t2i_engine.checkpoint.io import safe_torch_load, save_torch
from t2i_engine.errors import CheckpointError, ConfigError
from t2i_engine.training.checkpoints import CheckpointPaths, publish, staging_paths
from t2i_engine.training.config import TrainConfig

__all__ = ["check_fsdp", "fsdp_strategy", "load_fsdp", "save_fsdp"]


def check_fsdp(cfg: TrainConfig, *, device_type: str | None = None, checkpoint_dir: str = "") -> None:
    """Refuse ``strategy = "fsdp"`` where it cannot work, naming the key and the way out.

    ``device_type`` is the device of a ready Fabric; without it the accelerator is resolved
    from ``cfg.accelerator`` and what this machine has."""
    if cfg.strategy != "fsdp":
        return
    if "://" in checkpoint_dir:
        raise ConfigError(f"train.strategy: 'fsdp' checkpoints are written by Fabric to a local folder, "
                          f"not to {checkpoint_dir!r}")
    if device_type is None:
        cuda = torch.cuda.is_available()
        device_type = "cuda" if cfg.accelerator in ("cuda", "gpu") or (cfg.accelerator == "auto" and cuda) \
            else "cpu" if cfg.accelerator in ("cpu", "auto") else cfg.accelerator
    if device_type != "cuda":
        raise ConfigError(f"train.strategy: 'fsdp' needs CUDA GPUs (Lightning Fabric does not run FSDP on "
                          f"'{device_type}'); use strategy = 'ddp' or 'auto' here")
    if cfg.ema:
        raise ConfigError("train.ema is not supported with strategy = 'fsdp' yet (the EMA needs "
                          "unsharded weights); use strategy = 'ddp' or ema = false")
    if cfg.sample_every:
        raise ConfigError("train.sample_every is not supported with strategy = 'fsdp' (sampling needs the "
                          "unsharded model in one process); set it to 0 or use strategy = 'ddp'")


def fsdp_strategy() -> Any:
    """Fabric's FSDPStrategy: full state dicts for checkpoints, one FSDP unit per shared block."""
    from lightning_fabric.strategies import FSDPStrategy

    from t2i_engine.nn.attention import SpatialTransformer
    from t2i_engine.nn.resblock import ResBlock

    return FSDPStrategy(state_dict_type="full", auto_wrap_policy={ResBlock, SpatialTransformer})


def save_fsdp(fabric: Fabric, wrapped: nn.Module, optimizer: Any, scheduler: Any, train_state: dict[str, Any], *,
              checkpoint_dir: str, step: int, keep_last: int) -> str:
    """Collective: every rank calls it. Fabric writes the full model, optimizer and scheduler
    state to ``fabric.ckpt`` (from rank 0), rank 0 the train state (step, data position, RNG) to
    ``state.pt``, and publishes the folder (or raises StorageError leaving no step folder).
    Returns the folder on rank 0, "" elsewhere."""
    staged = fabric.broadcast(staging_paths(checkpoint_dir, step).dir)  # one folder for all ranks
    paths = CheckpointPaths(checkpoint_dir, step, folder=staged.rpartition("/")[2])
    error: OSError | None = None
    try:
        if fabric.global_rank == 0:
            Path(paths.dir).mkdir(parents=True, exist_ok=True)
        fabric.save(paths.fabric, {"model": wrapped, "optimizer": optimizer, "scheduler": scheduler.state_dict()})
    except OSError as exc:  # publish() below turns it into a StorageError and removes the folder
        error = exc
    fabric.barrier()
    if fabric.global_rank != 0:
        return ""

    def write_train_state() -> None:
        if error is not None:
            raise error
        save_torch(train_state, paths.state)

    return publish(checkpoint_dir, step, paths, keep_last=keep_last, write=write_train_state)


def load_fsdp(fabric: Fabric, wrapped: nn.Module, optimizer: Any, scheduler: Any, *, checkpoint_dir: str,
              step: int) -> dict[str, Any]:
    """Restore model and optimizer (sharded again on load) and the scheduler from the FSDP
    checkpoint of ``step`` with ``fabric.load``; returns its train state."""
    paths = CheckpointPaths(checkpoint_dir, step)
    rest = fabric.load(paths.fabric, {"model": wrapped, "optimizer": optimizer})
    scheduler.load_state_dict(rest["scheduler"])
    train_state = safe_torch_load(paths.state)
    if not isinstance(train_state, dict) or train_state.get("step") != step:
        raise CheckpointError(f"{paths.state} does not describe step {step}")
    return train_state
