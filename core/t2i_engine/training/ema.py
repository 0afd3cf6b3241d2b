"""Exponential moving average of a model's trainable weights.

The EMA weights are the ones sampling and export use: wrap the code in
``with ema.swapped_into(model): ...`` and the model's trainable parameters hold the EMA values
for the duration, then get their training values back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


def _named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Names (as in ``model.state_dict()``) of the parameters ``trainable_parameters`` yields."""
    wanted = {id(p) for p in model.trainable_parameters()}  # type: ignore[operator]
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


class EMA:
    """Shadow copies (float32) of the model's trainable parameters.

    Before ``start`` the shadow simply copies the weights; from then on, every ``interval`` steps,
    ``shadow = decay * shadow + (1 - decay) * weight``.
    """

    def __init__(self, model: nn.Module, *, decay: float, start: int = 0, interval: int = 1) -> None:
        self.decay = float(decay)
        self.start = int(start)
        self.interval = int(interval)
        self.shadow: dict[str, Tensor] = {
            n: p.detach().to(torch.float32).clone() for n, p in _named_trainable(model).items()}
        self._cache: tuple[int, list[Tensor], list[Tensor]] | None = None  # (id(model), shadows, params)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the model's current weights into the average; ``step`` is the optimizer step
        just completed (1-based)."""
        if step <= self.start:
            params = _named_trainable(model)
            for n, p in params.items():
                self.shadow[n].copy_(p.detach())
            return
        if step % self.interval:
            return
        if self._cache is None or self._cache[0] != id(model):
            params = _named_trainable(model)
            self._cache = (id(model), [self.shadow[n] for n in params], [p.detach() for p in params.values()])
        _, shadows, weights = self._cache
        torch._foreach_lerp_(shadows, [w.to(torch.float32) for w in weights], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (restored on exit, even on error)."""
        params = _named_trainable(model)
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable weights with the EMA (for export)."""
        for n, p in _named_trainable(model).items():
            p.copy_(self.shadow[n])

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow weights, keyed like ``model.state_dict()`` (safetensors-ready)."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore shadow weights; the key sets must match exactly."""
        from t2i_engine.errors import CheckpointError

        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise CheckpointError(f"EMA weights do not fit the model: missing {missing[:20]}, "
                                  f"unexpected {unexpected[:20]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)
