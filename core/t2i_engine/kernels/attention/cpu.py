"""bf16 attention on the CPU as two oneDNN batched matmuls around a softmax, in chunks.

PyTorch's CPU flash-attention kernel (what ``F.scaled_dot_product_attention`` runs) is slower
in bf16 than in float32 at SD's head dims: at (2 x 8 heads, 1024 tokens, head dim 40) it takes
33 ms where ``baddbmm -> softmax -> bmm`` in bf16 takes 16 ms on the machine of
docs/benchmarks.md. On another (an AMD EPYC of the Zen 5 family) it was the other way round at that
length (43 against 52 ms) and still 2x faster at 256 tokens, so whether this path runs is chosen per
machine and sequence length (:mod:`t2i_engine.kernels.cpu_paths`). The price is a bf16 score matrix (rounded before the softmax, where the flash
kernel keeps float32): inside a bf16 SD-1.5 UNet the output's error against float32 is the same
either way (rms 0.0042), because every linear and convolution already rounds to bf16.

The score matrix is built :data:`SCORE_BUDGET` bytes at a time (chunks of heads, then of
queries), so memory stays bounded at any sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SCORE_BUDGET", "bmm_attention"]

SCORE_BUDGET = 32 << 20
"""Bytes of scores held at once (one chunk): 32 MiB, 16 heads x 1024 x 1024 in bf16."""


def bmm_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale) v`` for ``(B, heads, L, head_dim)`` tensors of one dtype, no mask.

    The scale is applied inside the first matmul (``baddbmm``'s ``alpha``, before rounding).
    Returns ``(B, heads, Lq, head_dim)``, contiguous.
    """
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    scale = d**-0.5 if scale is None else scale
    q3, k3, v3 = q.reshape(b * h, lq, d), k.reshape(b * h, lk, d), v.reshape(b * h, lk, dv)
    out = torch.empty(b * h, lq, dv, dtype=q.dtype, device=q.device)
    row_bytes = lk * q.element_size()
    heads_per_chunk = max(1, SCORE_BUDGET // max(lq * row_bytes, 1))
    rows_per_chunk = lq if heads_per_chunk > 1 or lq * row_bytes <= SCORE_BUDGET else max(1, SCORE_BUDGET // row_bytes)
    dummy = q3.new_empty(1, 1, 1)  # baddbmm's ignored input (beta = 0)
    for i in range(0, b * h, heads_per_chunk):
        hs = slice(i, i + heads_per_chunk)
        kt = k3[hs].transpose(1, 2)
        for j in range(0, lq, rows_per_chunk):
            rs = slice(j, j + rows_per_chunk)
            scores = torch.baddbmm(dummy, q3[hs, rs], kt, beta=0.0, alpha=scale)
            torch.bmm(scores.softmax(dim=-1), v3[hs], out=out[hs, rs])
    return out.view(b, h, lq, dv)
