"""Helpers for the Triton kernel modules (imported only once Triton is needed)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, Callable

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


@contextlib.contextmanager
def _interpreted_language() -> Iterator[None]:
    """Swap triton.language's own ``@jit`` helpers (tl.sum, tl.max, tl.sigmoid ...) for
    interpreted ones while an interpreted kernel runs.

    Triton builds those helpers once, when triton.language is imported, as compiled or
    interpreted functions depending on ``TRITON_INTERPRET`` at that moment; a compiled one called
    from an interpreted kernel fails. Swapping them per launch makes the interpreter work
    whenever triton was imported (it is what ``TRITON_INTERPRET=1`` at import would have built).
    """
    saved: list[tuple[Any, str, Any]] = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("triton.language"):
            continue
        for name, value in list(vars(mod).items()):
            if isinstance(value, JITFunction):
                saved.append((mod, name, value))
                setattr(mod, name, InterpretedFunction(value.fn))
    try:
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


class _InterpretedLauncher:
    """``kernel[grid](...)`` for CPU tensors through Triton's interpreter."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = InterpretedFunction(fn)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            kwargs.pop("num_warps", None)
            kwargs.pop("num_stages", None)
            with _interpreted_language():
                return self._fn[grid](*args, **kwargs)

        return launch


class DualKernel:
    """A Triton kernel that runs compiled on CUDA tensors and interpreted on CPU tensors.

    ``triton.jit`` decides between compiling and interpreting when the module is imported, from
    ``TRITON_INTERPRET``. Building both lazily and choosing by device lets one process run the
    interpreter in tests whatever the import order.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Any = None
        self._interpreted: _InterpretedLauncher | None = None
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def on(self, device: torch.device) -> Any:
        """The launchable kernel for tensors on ``device`` (index it with the grid)."""
        if device.type == "cpu":
            if self._interpreted is None:
                self._interpreted = _InterpretedLauncher(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.jit(self.fn)
        return self._compiled


def dual_kernel(fn: Callable[..., Any]) -> DualKernel:
    """Decorator: wrap a Triton kernel body as a :class:`DualKernel`."""
    return DualKernel(fn)
