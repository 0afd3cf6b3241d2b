"""GroupNorm with an optional fused SiLU, the specification: plain PyTorch in float32.

x (B, C, *spatial) is split into ``num_groups`` groups of C / num_groups channels; each group
of each sample is normalised with its own mean and biased variance, then scaled by
``weight[c]``, shifted by ``bias[c]``, and passed through SiLU when asked.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Activation = Literal["silu"] | None


def group_norm_reference(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    activation: Activation = None,
) -> Tensor:
    """GroupNorm (+SiLU) computed in float32, returned in ``x.dtype`` (contiguous).

    Args:
        x: (B, C, *spatial), any memory format.
        num_groups: number of groups; must divide C.
        weight: (C,) scale, or None for 1.
        bias: (C,) shift, or None for 0.
        eps: added to the variance.
        activation: None or "silu".
    """
    B, C = x.shape[:2]
    xg = x.float().reshape(B, num_groups, -1)  # (B, G, C/G * spatial)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(B, C, -1)  # (B, C, L)
    if weight is not None:
        y = y * weight.float()[:, None]
    if bias is not None:
        y = y + bias.float()[:, None]
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y.reshape(x.shape).to(x.dtype)
