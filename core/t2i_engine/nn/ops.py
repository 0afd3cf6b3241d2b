"""The one adapter between the nn blocks and the engine's compute ops.

Every block in :mod:`t2i_engine.nn` calls :func:`attention` and :func:`group_norm` from here,
never torch directly, so that the fused kernels of :mod:`t2i_engine.kernels` (Triton on CUDA,
the best PyTorch path elsewhere) are picked up in one place. While the kernels package is not
importable the plain PyTorch paths below are used; they are the same maths.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = Literal["silu"] | None


def _kernels():  # noqa: ANN202 - the module or None
    try:
        from t2i_engine import kernels
    except ImportError:
        return None
    if not (hasattr(kernels, "attention") and hasattr(kernels, "group_norm")):
        return None
    return kernels


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
              scale: float | None = None) -> Tensor:
    """Scaled dot-product attention over ``(B, heads, L, head_dim)`` tensors.

    ``key_padding_mask`` is ``(B, Lk)`` bool, True where a key is real. Returns
    ``(B, heads, Lq, head_dim)``.
    """
    kernels = _kernels()
    if kernels is not None:
        return kernels.attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, *,
               eps: float = 1e-5, activation: Activation = None) -> Tensor:
    """GroupNorm over ``(B, C, ...)`` with an optional fused SiLU after the affine transform."""
    kernels = _kernels()
    if kernels is not None:
        return kernels.group_norm(x, num_groups, weight, bias, eps=eps, activation=activation)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y
