"""The step window of a conditioner and the clock that tells the composed net which step runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["StepClock", "in_window"]


def in_window(i: int, n: int, *, start: float, end: float) -> bool:
    """Whether step ``i`` of ``n`` lies in the window ``[start, end]`` (fractions of the steps).

    The rule of diffusers' ControlNet pipelines (``control_guidance_start``/``_end``): step ``i``
    is kept unless ``i / n < start`` or ``(i + 1) / n > end``.
    """
    return not (i / n < start or (i + 1) / n > end)


class StepClock:
    """Which sampler step is running: :meth:`clocked` wraps the sampler callback (called once
    after each step) to count. With no run in progress (training, a direct call) ``total`` is
    None and every window is open."""

    def __init__(self) -> None:
        self.step = 0
        self.total: int | None = None

    def open(self, *, start: float, end: float) -> bool:
        """Whether a conditioner with this window acts at the current step."""
        if self.total is None or (start <= 0.0 and end >= 1.0):
            return True
        return in_window(self.step, self.total, start=start, end=end)

    def clocked(self, callback: Callable[[dict[str, Any]], None] | None, *,
                total: int) -> Callable[[dict[str, Any]], None]:
        """Start a run of ``total`` steps; the returned callback advances the clock, then calls
        ``callback``. Pass it to the sampler."""
        self.step, self.total = 0, total

        def tick(info: dict[str, Any]) -> None:
            self.step += 1
            if callback is not None:
                callback(info)

        return tick

    def stop(self) -> None:
        """End the run: windows are open again (training, direct calls)."""
        self.step, self.total = 0, None
