"""group_norm(): F.group_norm (+ F.silu), or the fused Triton kernel when ``T2I_KERNELS=triton``."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from t2i_engine.kernels._backend import grad_needed, use_triton

__all__ = ["group_norm", "triton_unsupported_reason"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float32, torch.float16)  # the interpreter cannot run bfloat16 constants


def _triton_ops() -> Any:
    """The Triton module, imported on first use: it imports triton and registers the
    ``t2i_engine::group_norm_*`` custom ops. A plain import statement, which torch.compile runs while
    tracing (importlib calls would break the graph)."""
    from t2i_engine.kernels.group_norm import triton

    return triton


def triton_unsupported_reason(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None
) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None when it can."""
    allowed = _DTYPES if x.device.type == "cuda" else _CPU_DTYPES
    if x.dtype not in allowed:
        return f"dtype {x.dtype} is not supported on {x.device.type}"
    if x.dim() < 2 or x.numel() == 0:
        return "x must be a non-empty (B, C, *spatial) tensor"
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != x.shape[1] or p.device != x.device):
            return f"{name} must be a ({x.shape[1]},) tensor on {x.device}"
    if x.numel() >= 2**31:
        return "more than 2**31 elements (32-bit offsets)"
    return None


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    activation: Literal["silu"] | None = None,
) -> Tensor:
    """GroupNorm over ``num_groups`` channel groups, optionally followed by SiLU, in one pass.

    Args:
        x: (B, C, H, W) in NCHW or channels_last memory format, or (B, C, L); C must be
            divisible by num_groups.
        num_groups: number of channel groups.
        weight: (C,) per-channel scale, or None.
        bias: (C,) per-channel shift, or None.
        eps: added to the group variance.
        activation: None, or "silu" to return ``silu(group_norm(x))`` fused.

    Returns:
        A tensor of x's shape and dtype (statistics are float32). The Triton path keeps x's
        memory format.

    Runs ``F.group_norm`` (then ``F.silu``), or the fused Triton kernels for CUDA
    float32/float16/bfloat16 inputs when ``T2I_KERNELS=triton`` (opt-in: eager was faster on an
    H200, docs/kernels.md).
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', not {activation!r}")
    if x.dim() < 2 or x.shape[1] % num_groups != 0:
        raise ValueError(f"channels ({x.shape[1] if x.dim() > 1 else '?'}) must be divisible by num_groups ({num_groups})")
    silu = activation == "silu"
    if use_triton("group_norm", x.device, triton_unsupported_reason(x, num_groups, weight, bias)):
        return _triton_ops().triton_group_norm(x, num_groups, weight, bias, eps=eps, silu=silu)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    # y is ours: without autograd the SiLU may overwrite it (one activation-sized buffer less)
    return F.silu(y, inplace=not grad_needed(y)) if silu else y
