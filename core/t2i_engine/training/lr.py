"""Learning-rate schedule: linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["lr_factor"]


def lr_factor(step: int, *, warmup_steps: int, max_steps: int,
              schedule: Literal["constant", "cosine"], min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based, the step about to run).

    Warm-up rises linearly from ``1/(warmup_steps+1)`` to 1; cosine then falls from 1 to
    ``min_ratio`` at ``max_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
