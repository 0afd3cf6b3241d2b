"""Gradient checkpointing for the shared blocks: recompute a block's activations in the backward
pass instead of keeping them (``torch.utils.checkpoint``, non-reentrant).

A block that supports it has a ``gradient_checkpointing`` attribute (False by default) and starts
its ``forward`` with::

    if wants_checkpoint(self):
        return checkpoint_call(self, self.forward, x, temb)

:func:`enable_gradient_checkpointing` sets the flag on every such block of a model (the UNet's
:class:`~t2i_engine.nn.resblock.ResBlock` and :class:`~t2i_engine.nn.attention.SpatialTransformer`,
the SD text tower). A flagged block runs checkpointed only in training mode with gradients
enabled; inference and ``torch.no_grad`` run exactly as before. Parameters, state-dict keys and
results are unchanged: only the memory held between forward and backward shrinks, for one more
forward per block during backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_call", "enable_gradient_checkpointing", "wants_checkpoint"]

_ACTIVE = "_t2i_checkpoint_active"


def wants_checkpoint(module: nn.Module) -> bool:
    """True when ``module`` should run its forward through :func:`checkpoint_call` now: its flag
    is on, it is training, gradients are enabled, and it is not already inside that call."""
    return (bool(getattr(module, "gradient_checkpointing", False)) and module.training
            and torch.is_grad_enabled() and not getattr(module, _ACTIVE, False))


def checkpoint_call(module: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under :func:`torch.utils.checkpoint.checkpoint`; while ``fn`` runs
    (and when the backward pass recomputes it) ``module`` is marked, so that ``fn`` may be the
    module's own ``forward``."""
    def run(*a: Any, **k: Any) -> Any:
        setattr(module, _ACTIVE, True)
        try:
            return fn(*a, **k)
        finally:
            setattr(module, _ACTIVE, False)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(model: nn.Module, *, enabled: bool = True) -> int:
    """Turn gradient checkpointing on (or off) in every submodule of ``model`` that supports it
    (has a ``gradient_checkpointing`` attribute); returns how many were set."""
    count = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = enabled
            count += 1
    return count
