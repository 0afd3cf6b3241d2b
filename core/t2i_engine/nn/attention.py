"""Attention blocks: multi-head (cross-)attention, the GEGLU feed-forward, the transformer block,
the spatial transformer that runs it over a feature map, and the single-head spatial self-attention
of autoencoders.

References: "Attention Is All You Need" (Vaswani et al. 2017); GEGLU from "GLU Variants Improve
Transformer" (Shazeer 2020); the spatial transformer from Latent Diffusion (Rombach et al. 2022).
Parameter names follow the diffusers layout (``to_q``, ``to_out.0``, ``ff.net.0.proj`` ...).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.kernels._backend import grad_needed
from t2i_engine.nn import ops
from t2i_engine.nn.checkpointing import checkpoint_call, wants_checkpoint
from t2i_engine.nn.resblock import GroupNorm


_CONTEXT_KV: contextvars.ContextVar[dict[int, tuple[Any, ...]] | None] = contextvars.ContextVar(
    "t2i_context_kv", default=None)


@contextlib.contextmanager
def reuse_context_kv() -> Iterator[None]:
    """Within this block, each cross-attention layer projects a context tensor to keys and values
    once and reuses them for as long as the same tensor object comes back (no gradient needed).

    A sampling loop calls the network with one text embedding at every step, and recomputing its
    keys and values each time is 5.9 GFLOP a step for SD-1.5 (6.5 % of the step at 128 px). The
    cache is keyed by the context tensor's identity, so the caller must not change that tensor in
    place inside the block (:func:`t2i_engine.pipeline.denoise`, which holds it, does not); weights
    must not change either. Only this class caches: attention blocks of other modules (the Imagen
    plugin's) project as before. It is dropped when the block ends."""
    token = _CONTEXT_KV.set({})
    try:
        yield
    finally:
        _CONTEXT_KV.reset(token)


class Attention(nn.Module):
    """Multi-head attention of ``x (B, L, query_dim)`` over ``context (B, Lc, context_dim)``.

    Without a context it is self-attention. ``context_mask`` ``(B, Lc)`` is True for real tokens.
    ``upcast`` computes the attention itself in float32 when the inputs are half precision.
    """

    def __init__(self, query_dim: int, *, context_dim: int | None = None, heads: int = 8,
                 head_dim: int = 64, qkv_bias: bool = False, dropout: float = 0.0, upcast: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.head_dim = head_dim
        self.upcast = upcast
        self.to_q = ops.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = ops.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = ops.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([ops.Linear(inner, query_dim), nn.Dropout(dropout)])

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, L, head_dim)

    def _keys_values(self, context: Tensor, *, reusable: bool) -> tuple[Tensor, Tensor]:
        # not while torch.compile traces: a graph cannot hold a Python-side cache
        cache = _CONTEXT_KV.get() if reusable and not torch.compiler.is_compiling() else None
        if cache is None or grad_needed(context, self.to_k.weight, self.to_v.weight):
            return self._split(self.to_k(context)), self._split(self.to_v(context))
        device = context.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        hit = cache.get(id(self))
        if hit is not None and hit[0] is context and hit[1] == autocast:
            return hit[2], hit[3]
        k, v = self._split(self.to_k(context)), self._split(self.to_v(context))
        cache[id(self)] = (context, autocast, k, v)  # holds the context: its id cannot be reused meanwhile
        return k, v

    def forward(self, x: Tensor, context: Tensor | None = None, *, context_mask: Tensor | None = None) -> Tensor:
        k, v = self._keys_values(x if context is None else context, reusable=context is not None and context is not x)
        q = self._split(self.to_q(x))
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = ops.attention(q.float(), k.float(), v.float(), key_padding_mask=context_mask).to(q.dtype)
        else:
            out = ops.attention(q, k, v, key_padding_mask=context_mask)  # (B, heads, L, head_dim)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, L, inner)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Linear projection to twice the width, gated by the GELU of one half."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = ops.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``dim -> mult*dim (gated) -> dim``; keys ``net.0.proj``, ``net.2``."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), ops.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the context, GEGLU feed-forward."""

    def __init__(self, dim: int, *, heads: int, head_dim: int, context_dim: int | None,
                 dropout: float = 0.0, upcast: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, dropout=dropout, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim=context_dim, heads=heads, head_dim=head_dim, dropout=dropout,
                               upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, *, context_mask: Tensor | None = None) -> Tensor:
        x = ops.add_(self.attn1(self.norm1(x)), x)
        x = ops.add_(self.attn2(self.norm2(x), context, context_mask=context_mask if context is not None else None), x)
        return ops.add_(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, conditioned by cross-attention.

    ``x (B, C, H, W), context (B, Lc, context_dim) -> (B, C, H, W)``. ``linear_projection``
    selects linear (SD 2) instead of 1x1-convolution (SD 1) projections in and out; ``upcast``
    runs the attention in float32 under half precision.
    """

    gradient_checkpointing = False  # recompute in backward (nn/checkpointing.py)

    def __init__(self, channels: int, *, heads: int, context_dim: int | None, depth: int = 1,
                 groups: int = 32, linear_projection: bool = False, dropout: float = 0.0,
                 upcast: bool = False) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        head_dim = channels // heads
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: ops.Linear(channels, channels)) if linear_projection else (lambda: ops.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads=heads, head_dim=head_dim, context_dim=context_dim, dropout=dropout,
                             upcast=upcast)
            for _ in range(depth)
        )
        self.proj_out = proj()

    def forward(self, x: Tensor, context: Tensor | None = None, *, context_mask: Tensor | None = None) -> Tensor:
        if wants_checkpoint(self):
            return checkpoint_call(self, self.forward, x, context, context_mask=context_mask)
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, c)  # (B, HW, C)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask=context_mask)
        if self.linear_projection:
            h = self.proj_out(h)
        # (B, C, H, W), made contiguous: a channels_last view here would carry that layout into the
        # following ResBlocks, whose convolutions then reorder activations and weight gradients
        h = h.reshape(b, hgt, wid, c).permute(0, 3, 1, 2).contiguous()
        if not self.linear_projection:
            h = self.proj_out(h)
        return ops.add_(h, x)


class SpatialSelfAttention(Attention):
    """Single-head self-attention over a feature map with its own GroupNorm and a residual
    (the mid-block attention of the KL autoencoder): ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = GroupNorm(groups, channels, eps=eps)

    def forward(self, x: Tensor, context: Tensor | None = None, *, context_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        b, c, hgt, wid = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)
        return ops.add_(h.transpose(1, 2).reshape(b, c, hgt, wid), x)
