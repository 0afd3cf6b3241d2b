"""The specification of the dense ops: PyTorch's own ``F.linear`` and ``F.conv2d``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["conv2d", "linear"]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` over the last dim of ``x`` (``(..., in) -> (..., out)``)."""
    return F.linear(x, weight, bias)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | tuple[int, int] = 1,
           padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1,
           groups: int = 1) -> Tensor:
    """2-D convolution of ``(B, C, H, W)`` by ``(out, C / groups, kh, kw)`` weights."""
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
