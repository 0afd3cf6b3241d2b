"""The engine's own kernels: fused attention and GroupNorm(+SiLU), and the dense layers' CPU path.

Each op lives in ``kernels/<op>/``: ``reference.py`` is the plain-PyTorch specification,
``triton.py`` the Triton kernels (forward and backward, registered as torch.library custom ops),
``dispatch.py`` the public function that picks the path: PyTorch's ops by default (they outran
the Triton kernels on an H200, docs/kernels.md), the Triton kernels when ``T2I_KERNELS=triton``.
``dense/`` routes float32 linear and 1x1 convolutions on the CPU through oneDNN (no Triton kernel). ``T2I_KERNELS=auto|torch|triton`` overrides the choice (see
:mod:`t2i_engine.kernels._backend`). Importing this package never imports triton.
"""

from t2i_engine.kernels._backend import KernelUnavailableError, requested_backend
from t2i_engine.kernels.attention.dispatch import attention
from t2i_engine.kernels.dense.dispatch import conv2d, linear
from t2i_engine.kernels.group_norm.dispatch import group_norm

__all__ = ["KernelUnavailableError", "attention", "conv2d", "group_norm", "linear", "requested_backend"]
