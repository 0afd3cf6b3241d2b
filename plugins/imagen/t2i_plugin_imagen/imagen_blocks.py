"""Building blocks of the Imagen UNets (Saharia et al. 2022, appendix B / figures A.27-A.30), in
NVIDIA NeMo's layout (``nemo/collections/multimodal/modules/imagen/diffusionmodules``), so a NeMo
Imagen state dict maps one to one (parameter names: ``in_layers``, ``emb_layers``, ``kv_context``
...).

* :class:`ResBlock`: guided-diffusion's residual block with scale-shift norm, optionally
  resampling inside (average pool down, transposed-conv up).
* :class:`EfficientResBlock`: the Efficient U-Net block (fig. A.27): a 1x1 shortcut scaled by
  ``1/sqrt(2)`` when ``skip_connection_scaling``.
* :class:`FusedCrossAttention`: one attention whose keys are the image's own and the text's
  (``attention_type = "fused"``); :class:`StackedCrossAttention`: self-attention, then
  cross-attention, then a GEGLU feed-forward (``"stacked"``).
* :class:`SelfAttentionPooling`: one learned score per text token, softmax over the tokens, the
  weighted sum: the pooled text added to the time embedding.
* :class:`LearnedSinusoidalEmbedding`: random-Fourier time features with learned frequencies.

Residual branches end in zero-initialised layers (``out_layers`` conv, ``proj_out``), as NeMo's
``zero_module``: a fresh block is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.nn import ops
from t2i_engine.nn.embeddings import timestep_embedding


def zero_init(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to 0 (the residual branch starts as nothing)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def heads_of(channels: int, *, num_heads: int, head_channels: int) -> int:
    """NeMo's head count: ``channels // head_channels`` when ``head_channels > 0``, else ``num_heads``."""
    if head_channels > 0:
        if channels % head_channels:
            raise ValueError(f"attention: {channels} channels are not divisible by per_head_channels {head_channels}")
        return channels // head_channels
    if channels % num_heads:
        raise ValueError(f"attention: {channels} channels are not divisible by num_attn_heads {num_heads}")
    return num_heads


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, heads * d, L)`` (head-major channels, NeMo's layout) -> ``(B, heads, L, d)``."""
    B, C, L = x.shape
    return x.reshape(B, heads, C // heads, L).transpose(2, 3)


def _merge_heads(x: Tensor) -> Tensor:
    """``(B, heads, L, d)`` -> ``(B, heads * d, L)``."""
    B, H, L, d = x.shape
    return x.transpose(2, 3).reshape(B, H * d, L)


class ResBlock(nn.Module):
    """``x (B, in, H, W), emb (B, E) -> (B, out, H', W')``: GroupNorm-SiLU-conv, the time
    embedding as a scale and shift of the second norm (or added), GroupNorm-SiLU-conv; ``down``
    average-pools and ``up`` upsamples (transposed conv) both paths before the first conv."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, *, groups: int,
                 scale_shift_norm: bool = True, dropout: float = 0.0, up: bool = False, down: bool = False) -> None:
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.updown = up or down
        if up:  # NeMo's UpsampleLearnable: a 4x4 stride-2 transposed convolution
            self.h_upd: nn.Module = Resample(channels, "up")
            self.x_upd: nn.Module = Resample(channels, "up")
        elif down:
            self.h_upd, self.x_upd = nn.AvgPool2d(2), nn.AvgPool2d(2)
        self.scale_shift_norm = scale_shift_norm
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out if scale_shift_norm else out))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out, out, 3, padding=1)))
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        h = _condition(h, self.emb_layers(emb), self.out_layers, self.scale_shift_norm)
        return self.skip_connection(x) + h


def _condition(h: Tensor, emb: Tensor, out_layers: nn.Sequential, scale_shift: bool) -> Tensor:
    """The time embedding into ``h``: ``norm(h) (1 + scale) + shift`` then the rest, or added."""
    emb = emb[:, :, None, None].to(h.dtype)  # (B, 2C or C, 1, 1)
    if scale_shift:
        scale, shift = emb.chunk(2, dim=1)
        return out_layers[1:](out_layers[0](h) * (1 + scale) + shift)
    return out_layers(h + emb)


class EfficientResBlock(nn.Module):
    """The Efficient U-Net residual block: ``out(in(x), emb) + shortcut(x) * s`` with a 1x1
    shortcut always and ``s = 1/sqrt(2)`` when ``skip_scaling`` (Imagen fig. A.27)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, *, groups: int,
                 scale_shift_norm: bool = True, skip_scaling: bool = False) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.scale_shift_norm = scale_shift_norm
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_channels, 2 * out_channels if scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.shortcut = nn.Conv2d(channels, out_channels, 1)
        self.shortcut_scale = 1 / math.sqrt(2) if skip_scaling else 1.0

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = _condition(self.in_layers(x), self.emb_layers(emb), self.out_layers, self.scale_shift_norm)
        return h + self.shortcut(x) * self.shortcut_scale


class Resample(nn.Module):
    """2x resampling with parameters: ``down`` a 3x3 stride-2 conv (``op``), ``up`` a 4x4 stride-2
    transposed conv (``conv``), NeMo's ``Downsample(use_conv=True)`` / ``UpsampleLearnable``."""

    def __init__(self, channels: int, kind: str) -> None:
        super().__init__()
        if kind == "down":
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        else:
            self.conv = nn.ConvTranspose2d(channels, channels, 4, 2, 1)
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x) if self.kind == "down" else self.conv(x)


def _text_kv(proj: nn.Conv1d, norm: nn.GroupNorm, context: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values ``(B, C, L)`` of the text tokens ``(B, L, D)``: GroupNorm over channels, 1x1 conv."""
    k, v = proj(norm(context.transpose(1, 2))).chunk(2, dim=1)
    return k, v


def _attend(q: Tensor, k: Tensor, v: Tensor, heads: int, key_mask: Tensor | None) -> Tensor:
    """Multi-head attention over ``(B, C, L)`` channel-first tensors; ``key_mask`` ``(B, Lk)`` True = real."""
    out = ops.attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads),
                        key_padding_mask=key_mask)  # (B, heads, Lq, d)
    return _merge_heads(out)  # (B, C, Lq)


class FusedCrossAttention(nn.Module):
    """Self- and cross-attention fused: each pixel's query attends over the pixels' keys and the
    text tokens' keys together (NeMo ``FusedCrossAttentionBlock``); residual, zero-initialised."""

    def __init__(self, channels: int, context_dim: int, *, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm, self.norm_self = nn.GroupNorm(groups, channels), nn.GroupNorm(groups, channels)
        self.norm_context = nn.GroupNorm(groups, context_dim)
        self.q = nn.Conv1d(channels, channels, 1)
        self.kv_context = nn.Conv1d(context_dim, 2 * channels, 1)
        self.kv_self = nn.Conv1d(channels, 2 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        q = self.q(self.norm(flat))
        k_self, v_self = self.kv_self(self.norm_self(flat)).chunk(2, dim=1)  # (B, C, HW)
        k_ctx, v_ctx = _text_kv(self.kv_context, self.norm_context, context)  # (B, C, L)
        key_mask = torch.cat([torch.ones(B, H * W, dtype=torch.bool, device=x.device), mask], dim=1)
        h = _attend(q, torch.cat([k_self, k_ctx], 2), torch.cat([v_self, v_ctx], 2), self.heads, key_mask)
        return (flat + self.proj_out(h)).reshape(B, C, H, W)


class SelfAttention(nn.Module):
    """Spatial self-attention (NeMo ``SelfAttentionBlock``: one ``qkv`` 1x1 conv)."""

    def __init__(self, channels: int, *, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        q, k, v = self.qkv(self.norm(flat)).chunk(3, dim=1)
        return (flat + self.proj_out(_attend(q, k, v, self.heads, None))).reshape(B, C, H, W)


class CrossAttention(nn.Module):
    """Pixels attend over the text tokens only (NeMo ``CrossAttentionBlock``)."""

    def __init__(self, channels: int, context_dim: int, *, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm, self.norm_context = nn.GroupNorm(groups, channels), nn.GroupNorm(groups, context_dim)
        self.q = nn.Conv1d(channels, channels, 1)
        self.kv = nn.Conv1d(context_dim, 2 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        k, v = _text_kv(self.kv, self.norm_context, context)
        h = _attend(self.q(self.norm(flat)), k, v, self.heads, mask)
        return (flat + self.proj_out(h)).reshape(B, C, H, W)


class GEGLU(nn.Module):
    """Linear to twice the width, one half gated by the GELU of the other."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Residual GEGLU feed-forward over the channels of a feature map (NeMo ``FeedForward(glu=True)``)."""

    def __init__(self, channels: int, *, groups: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.net = nn.Sequential(GEGLU(channels, mult * channels), nn.Dropout(0.0), nn.Linear(mult * channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        h = self.net(self.norm(flat).transpose(1, 2)).transpose(1, 2)  # (B, C, HW)
        return (flat + h).reshape(B, C, H, W)


class StackedCrossAttention(nn.Module):
    """Norm, 1x1 conv, self-attention, cross-attention, feed-forward, zero 1x1 conv, plus the input
    (NeMo ``StackedCrossAttentionBlock``)."""

    def __init__(self, channels: int, context_dim: int, *, heads: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.self_attention_block = SelfAttention(channels, heads=heads, groups=groups)
        self.cross_attention_block = CrossAttention(channels, context_dim, heads=heads, groups=groups)
        self.ff = FeedForward(channels, groups=groups)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        h = self.cross_attention_block(self.self_attention_block(self.proj_in(self.norm(x))), context, mask)
        return x + self.proj_out(self.ff(h))


def attention_block(kind: str, channels: int, context_dim: int, *, heads: int, groups: int) -> nn.Module:
    """The text-conditioned attention of ``attention_type`` ``fused`` or ``stacked``."""
    if kind == "fused":
        return FusedCrossAttention(channels, context_dim, heads=heads, groups=groups)
    if kind == "stacked":
        return StackedCrossAttention(channels, context_dim, heads=heads, groups=groups)
    raise ValueError(f"attention_type must be 'fused' or 'stacked', got {kind!r}")


class SelfAttentionPooling(nn.Module):
    """Tokens ``(B, L, D)`` -> ``(B, D)``: softmax over a learned score per token, weighted sum
    (NeMo ``SelfAttentionPooling``; like NeMo, padding tokens are not masked out)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.W = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        weights = self.W(x).squeeze(-1).softmax(dim=1)  # (B, L)
        return (x * weights[..., None]).sum(dim=1)


class LearnedSinusoidalEmbedding(nn.Module):
    """``t (B,) -> (B, dim + 1)``: ``[t, sin(2 pi w t), cos(2 pi w t)]`` with learned ``w``
    (crowsonkb's v-diffusion; NeMo ``LearnedSinusoidalPosEmb``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"learned_sinu_pos_emb_dim must be even, got {dim}")
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, t: Tensor) -> Tensor:
        t = t[:, None].to(self.weights.dtype)
        freqs = t * self.weights[None] * 2 * math.pi  # (B, dim / 2)
        return torch.cat([t, freqs.sin(), freqs.cos()], dim=-1)


class SinusoidalEmbedding(nn.Module):
    """Fixed ``[cos, sin]`` features of ``t`` (NeMo ``UnLearnedSinusoidalPosEmb``, max period 1e4)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        return timestep_embedding(t, self.dim, flip_sin_to_cos=True, freq_shift=0.0)


def time_embedding(embed_dim: int, learned_dim: int) -> nn.Sequential:
    """NeMo's ``time_embed``: sinusoid (learned when ``learned_dim > 0``) -> Linear -> SiLU -> Linear
    to ``4 * embed_dim``."""
    out = 4 * embed_dim
    sinus: nn.Module = LearnedSinusoidalEmbedding(learned_dim) if learned_dim > 0 else SinusoidalEmbedding(embed_dim)
    width = learned_dim + 1 if learned_dim > 0 else embed_dim
    return nn.Sequential(sinus, nn.Linear(width, out), nn.SiLU(), nn.Linear(out, out))
