"""Statistics the benchmark scripts share (no torch import: a driver process stays light)."""

from __future__ import annotations

import random
import statistics

__all__ = ["median_interval"]


def median_interval(values: list[float], *, level: float = 0.95, resamples: int = 10_000,
                    seed: int = 0) -> tuple[float, float, float]:
    """``(median, low, high)``: the median and its percentile-bootstrap ``level`` interval."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return statistics.median(values), medians[int(tail * resamples)], medians[int((1 - tail) * resamples) - 1]
