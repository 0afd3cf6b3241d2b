"""The ``[train]`` table: every knob of the Fabric training loop, with defaults and validators."""

from __future__ import annotations

from typing import Any, Literal

import attrs
from attrs.validators import ge, gt, in_, le

from t2i_engine.config.fields import option
from t2i_engine.config.limits import seed_value

__all__ = ["TrainConfig"]


def _two_betas(_inst: Any, attribute: attrs.Attribute, value: list[float]) -> None:
    if len(value) != 2 or not all(0.0 <= float(b) < 1.0 for b in value):
        raise ValueError(f"{attribute.name} must be two numbers in [0, 1), got {value!r}")


def _optional_positive(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 or left out (no clipping), got {value!r}")


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Schema of the ``[train]`` table of a run config (all keys optional)."""

    # --- hardware and distribution (Lightning Fabric) ---
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = option(
        default="auto", validator=in_(("auto", "cpu", "cuda", "gpu", "mps")),
        help="Fabric accelerator")
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = option(
        default="32-true", validator=in_(("32-true", "bf16-mixed", "16-mixed")),
        help="numeric precision: fp32, bf16 autocast, or fp16 autocast with a grad scaler")
    strategy: Literal["auto", "ddp", "fsdp"] = option(
        default="auto", validator=in_(("auto", "ddp", "fsdp")), help="Fabric strategy")
    devices: int = option(default=1, validator=ge(1), help="devices (processes) per node")
    num_nodes: int = option(default=1, validator=ge(1),
                            help="nodes; launch with torchrun or SLURM, Fabric reads the env")
    deterministic: bool = option(default=False,
                                 help="torch.use_deterministic_algorithms (exact resume proofs)")

    # --- length and batching ---
    max_steps: int = option(default=1000, validator=ge(1), help="optimizer steps to train")
    batch_size: int = option(default=8, validator=ge(1), help="samples per device per micro-batch")
    grad_accum: int = option(default=1, validator=ge(1),
                             help="micro-batches accumulated per optimizer step")
    num_workers: int = option(default=0, validator=ge(0), help="DataLoader worker processes")
    max_bad_sample_fraction: float = option(
        default=0.01, validator=[ge(0.0), le(1.0)],
        help="corrupt samples tolerated (fraction); above it the run stops with a DataError")

    # --- optimizer (AdamW) and LR schedule ---
    lr: float = option(default=1e-4, validator=gt(0.0), help="peak learning rate")
    betas: list[float] = option(factory=lambda: [0.9, 0.999], validator=_two_betas,
                                help="AdamW betas")
    weight_decay: float = option(default=0.01, validator=ge(0.0), help="AdamW weight decay")
    eps: float = option(default=1e-8, validator=gt(0.0), help="AdamW epsilon")
    clip_grad_norm: float | None = option(default=1.0, validator=_optional_positive,
                                          help="max global gradient norm; none to not clip")
    warmup_steps: int = option(default=0, validator=ge(0), help="linear LR warm-up steps from 0")
    lr_schedule: Literal["constant", "cosine"] = option(
        default="constant", validator=in_(("constant", "cosine")),
        help="after warm-up: constant, or cosine decay to min_lr_ratio * lr at max_steps")
    min_lr_ratio: float = option(default=0.0, validator=[ge(0.0), le(1.0)],
                                 help="floor of the cosine schedule as a fraction of lr")

    # --- EMA of the trainable weights (what sampling and export use) ---
    ema: bool = option(default=True, help="keep an exponential moving average of the weights")
    ema_decay: float = option(default=0.9999, validator=[ge(0.0), le(1.0)], help="EMA decay")
    ema_start: int = option(default=0, validator=ge(0),
                            help="step before which the EMA just copies the weights")
    ema_interval: int = option(default=1, validator=ge(1), help="update the EMA every N steps")

    # --- model switches ---
    gradient_checkpointing: bool = option(default=False,
                                          help="ask the model to recompute activations")
    channels_last: bool = option(default=False, help="convert the model to channels_last")
    compile: bool = option(default=False, help="torch.compile the model's forward")

    # --- checkpoints, logging, sampling, validation ---
    checkpoint_every: int = option(default=1000, validator=ge(0),
                                   help="save every N steps (0: only at the end and on signals)")
    keep_last: int = option(default=3, validator=ge(1), help="checkpoints kept")
    resume: bool = option(default=False, help="continue from the latest checkpoint in output_dir")
    log_every: int = option(default=10, validator=ge(1), help="scalars logged every N steps")
    sample_every: int = option(default=0, validator=ge(0),
                               help="image grids from sample_prompts every N steps (0: never)")
    sample_prompts: list[str] = option(factory=list, help="fixed prompts for the image grids")
    sample_seed: int = option(default=0, validator=seed_value, help="seed of the sampling generator for the grids")
    val_every: int = option(default=0, validator=ge(0), help="validate every N steps (0: never)")
    val_batches: int = option(default=8, validator=ge(1), help="batches per validation")
    max_nonfinite_in_a_row: int = option(
        default=5, validator=ge(1),
        help="NaN/inf losses in a row before the run stops (each one skips its step)")
    progress_bar: bool = option(default=True, help="tqdm progress bar on rank 0")
