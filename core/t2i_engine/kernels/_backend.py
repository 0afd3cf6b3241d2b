"""Backend choice shared by every kernel: the ``T2I_KERNELS`` switch and where Triton can run.

``T2I_KERNELS`` (read on every call, so tests can flip it; a compiled graph keeps the choice it
was traced with):

* ``auto`` (default): PyTorch's ops everywhere (SDPA, ``F.group_norm``). Measured on an H200
  (docs/kernels.md, "GPU figures"), SDPA and eager GroupNorm beat the Triton kernels
  on SD-1.5 shapes and the engine with Triton generated at 0.69x the speed of the engine without,
  so ``auto`` does not pick them until a GPU measurement says they win.
* ``torch``: always the PyTorch path.
* ``triton``: always Triton (opt-in); inputs it cannot take raise :class:`KernelUnavailableError`.
  CPU tensors run through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` as well
  (slow: meant for tests on machines without a GPU).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from t2i_engine.errors import T2IError

__all__ = [
    "BACKEND_ENV",
    "Backend",
    "KernelUnavailableError",
    "cpu_inference_unsupported",
    "cpu_path_unsupported",
    "grad_needed",
    "interpret_mode",
    "requested_backend",
    "triton_available",
    "use_triton",
]

BACKEND_ENV = "T2I_KERNELS"
Backend = Literal["auto", "torch", "triton"]
_BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")
_TRUE = ("1", "true", "yes", "on")

# None until first asked; a module global (not functools.cache) so torch.compile can read it.
_TRITON_OK: bool | None = None


class KernelUnavailableError(T2IError, RuntimeError):
    """``T2I_KERNELS=triton`` forced a Triton kernel onto inputs it cannot run on."""


def requested_backend() -> Backend:
    """The backend named by ``T2I_KERNELS`` (``auto`` when unset)."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise KernelUnavailableError(
            f"{BACKEND_ENV}={value!r} is not one of {', '.join(_BACKENDS)}"
        )
    return value  # type: ignore[return-value]


def grad_needed(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will record an op on these tensors (grad mode on and one requires grad).

    Where it is False an op may overwrite its own intermediates in place (no backward reads them).
    """
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cpu_path_unsupported() -> str | None:
    """Why no CPU fast path (inference or training) may take a call, or None: they run outside
    ``torch.compile`` (checked first: what follows is not traceable) and when ``T2I_KERNELS`` is
    not ``torch``."""
    if torch.compiler.is_compiling():
        return "inside torch.compile"
    if requested_backend() == "torch":
        return f"{BACKEND_ENV}=torch"
    return None


def cpu_inference_unsupported(*tensors: torch.Tensor | None) -> str | None:
    """Why the CPU inference paths (oneDNN dense layers, bf16 attention) may not take a call, or
    None: :func:`cpu_path_unsupported`, and no gradient needed. Each path adds its own dtype,
    device and shape conditions."""
    reason = cpu_path_unsupported()
    if reason is None and grad_needed(*tensors):
        return "a gradient is needed"
    return reason


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def triton_available() -> bool:
    """True when the ``triton`` package imports (checked once, on first need)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:  # an import statement, not importlib: torch.compile can trace it
            import triton  # noqa: F401

            _TRITON_OK = True
        except Exception:  # missing or broken: the engine runs on PyTorch
            _TRITON_OK = False
    return _TRITON_OK


def use_triton(op: str, device: torch.device, unsupported: str | None) -> bool:
    """Decide whether ``op`` runs its Triton kernel.

    Args:
        op: the op's name, for error messages.
        device: the device of the inputs.
        unsupported: why the Triton kernel cannot take these inputs (dtype, shape ...),
            or None when it can.

    Returns:
        True for Triton, False for the PyTorch path.

    Raises:
        KernelUnavailableError: ``T2I_KERNELS=triton`` but Triton cannot run here.
    """
    backend = requested_backend()
    if backend == "torch":
        return False
    reason = unsupported
    if reason is None and device.type not in ("cuda", "cpu"):
        reason = f"device {device.type} is not supported"
    if reason is None and device.type == "cpu" and not interpret_mode():
        reason = "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
    if reason is None and not triton_available():
        reason = "the triton package is not installed"
    if backend == "triton":
        if reason is not None:
            raise KernelUnavailableError(f"{op}: {BACKEND_ENV}=triton but {reason}")
        return True
    # auto: PyTorch's ops, which outran the Triton kernels on an H200 (see the module docstring);
    # the interpreter is for tests that force Triton.
    return False


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()
