"""The optimizer the training loop builds: AdamW, fused where PyTorch has a fused kernel."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from t2i_engine.training.config import TrainConfig

__all__ = ["build_optimizer", "fused_supported"]

_FUSED_DEVICES = ("cpu", "cuda")


def fused_supported(params: list[nn.Parameter], cfg: TrainConfig) -> bool:
    """True when AdamW's fused (single-kernel) implementation can take ``params``: all floating
    point, on one CPU or CUDA device, and not sharded by FSDP (DTensor parameters)."""
    if cfg.strategy == "fsdp" or not params:
        return False
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= set(_FUSED_DEVICES) and all(p.is_floating_point() for p in params)


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` with the ``[train]`` table's lr, betas, weight decay and eps.

    The fused implementation reads and writes each parameter and its two moments once per step,
    where the default ``foreach`` one makes a pass per arithmetic op: on an 860M-parameter UNet on
    the CPU that is most of the optimizer step (docs/benchmarks.md). Same update rule.
    """
    params = list(params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay,
                             eps=cfg.eps, fused=fused_supported(params, cfg) or None)
