"""Attention, the specification: plain PyTorch in float32.

``softmax(q @ k^T * scale, masked) @ v`` with q (B, heads, Lq, head_dim) and k, v
(B, heads, Lk, head_dim); ``key_padding_mask`` (B, Lk) bool, True = keep the key. A query
whose keys are all masked gets a zero output (and zero gradients), as SDPA gives.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product attention computed in float32, returned in ``q.dtype``.

    Args:
        q: queries (B, heads, Lq, head_dim).
        k: keys (B, heads, Lk, head_dim).
        v: values (B, heads, Lk, head_dim).
        key_padding_mask: (B, Lk) bool, True where a key is kept; None keeps all.
        scale: score scale; ``head_dim ** -0.5`` when None.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # (B, heads, Lq, Lk)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        any_kept = keep.any(-1, keepdim=True)  # (B, 1, 1, 1)
        # Rows without any key: softmax over zeros, then multiplied by 0 (no NaN anywhere).
        s = s.masked_fill(~keep & any_kept, float("-inf")).masked_fill(~any_kept, 0.0)
        p = torch.softmax(s, dim=-1) * any_kept
    else:
        p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, v.float()).to(q.dtype)
