"""Helpers for the Triton kernel modules (imported only once Triton is needed)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


class DualKernel:
    """A Triton kernel that runs compiled on CUDA tensors and interpreted on CPU tensors.

    ``triton.jit`` decides between compiling and interpreting once, when the module is
    imported, from ``TRITON_INTERPRET``. Building both lazily and choosing by device lets the
    same process run the interpreter in tests without caring about import order.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Any = None
        self._interpreted: Any = None
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def on(self, device: torch.device) -> Any:
        """The launchable kernel for tensors on ``device`` (index it with the grid)."""
        if device.type == "cpu":
            if self._interpreted is None:
                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.jit(self.fn)
        return self._compiled


def dual_kernel(fn: Callable[..., Any]) -> DualKernel:
    """Decorator: wrap a Triton kernel body as a :class:`DualKernel`."""
    return DualKernel(fn)
