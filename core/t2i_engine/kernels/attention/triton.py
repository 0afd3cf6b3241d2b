"""Flash attention in Triton: forward and backward, registered as torch.library custom ops.

FlashAttention-2 (Dao, 2023, arXiv:2307.08691) in the shape of the Triton fused-attention
tutorial: the forward pass streams key/value blocks past one block of queries with an online
softmax and keeps the row log-sum-exp; the backward pass recomputes the probabilities from it,
one kernel for dK/dV (a key block against every query block) and one for dQ, so no atomics.

Layout: q (B, heads, Lq, head_dim), k/v (B, heads, Lk, head_dim), any strides (a transposed
view of a (B, L, heads, head_dim) projection is taken as is, no copy). The output is allocated
as (B, Lq, heads, head_dim) memory and returned transposed, so ``out.transpose(1, 2)
.reshape(B, Lq, heads * head_dim)`` is free. Any sequence length; head_dim is padded in the
kernel to the next power of two (40 -> 64, 80 -> 128, 160 -> 256). Statistics and
accumulators are float32 whatever the input dtype.

Scores run in the log2 domain (``exp2``, the scale folded with log2(e)); the saved
log-sum-exp is log2-based, +inf for a query whose keys are all masked (its output and
gradients are then zero).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from t2i_engine.kernels._backend import grad_needed, next_power_of_2
from t2i_engine.kernels._triton_utils import dual_kernel

__all__ = ["TritonAttention", "attention_backward", "attention_forward", "triton_attention"]

_LOG2E = 1.4426950408889634


@dual_kernel
def _attn_fwd_kernel(
    Q, K, V,  # inputs (B, H, Lq|Lk, D), any strides
    Mask,  # (B, Lk) uint8, 1 = keep; unused unless HAS_MASK
    Out,  # (B, H, Lq, D) output, same dtype as Q
    Lse,  # (B, H, Lq) float32 log2-sum-exp of the scaled scores, contiguous
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, Lq, Lk, head_dim,  # heads, query and key lengths, true head dim
    qk_scale,  # softmax scale * log2(e)
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < Lq

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            keep = tl.load(Mask + b * stride_mb + cols * stride_mn, mask=col_ok, other=0)
            col_ok = col_ok & (keep != 0)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing kept so far has max -inf: shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, m_i + tl.math.log2(l_safe), float("inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh * Lq + offs_m, lse, mask=m_ok)


@dual_kernel
def _attn_bwd_dkdv_kernel(
    Q, K, V, Mask, DO,  # inputs as in the forward; DO (B, H, Lq, D) output gradient
    Lse, Delta,  # (B, H, Lq) float32: forward log2-sum-exp, rowsum(dO * O)
    DK, DV,  # (B, H, Lk, D) outputs
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn,
    H, Lq, Lk, head_dim,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per loop step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    n_ok = offs_n < Lk
    key_ok = n_ok
    if HAS_MASK:
        keep = tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0)
        key_ok = key_ok & (keep != 0)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        rows = start_m + offs_m
        m_ok = rows < Lq
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
        lse = tl.load(Lse + pid_bh * Lq + rows, mask=m_ok, other=float("inf"))
        delta = tl.load(Delta + pid_bh * Lq + rows, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M) scores, transposed
        p_t = tl.math.exp2(s_t - lse[None, :])
        p_t = tl.where(key_ok[:, None] & m_ok[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@dual_kernel
def _attn_bwd_dq_kernel(
    Q, K, V, Mask, DO, Lse, Delta,  # as in the dK/dV kernel
    DQ,  # (B, H, Lq, D) output
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mn,
    H, Lq, Lk, head_dim,
    qk_scale, sm_scale,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < Lq
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=qd_mask, other=0.0)
    lse = tl.load(Lse + pid_bh * Lq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + pid_bh * Lq + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if HAS_MASK:
            keep = tl.load(Mask + b * stride_mb + cols * stride_mn, mask=col_ok, other=0)
            col_ok = col_ok & (keep != 0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(col_ok[None, :] & m_ok[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration


def _fwd_config(block_d: int, device: torch.device) -> dict[str, int]:
    """Block sizes and warps for the forward kernel (small fixed blocks under the interpreter)."""
    if device.type == "cpu":
        return {"BLOCK_M": 16, "BLOCK_N": 16}
    if block_d <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    if block_d <= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def _bwd_config(block_d: int, device: torch.device) -> tuple[dict[str, int], dict[str, int]]:
    """Configurations for the dK/dV kernel and the dQ kernel."""
    if device.type == "cpu":
        return {"BLOCK_M": 16, "BLOCK_N": 16}, {"BLOCK_M": 16, "BLOCK_N": 16}
    if block_d <= 64:
        return ({"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
                {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3})
    if block_d <= 128:
        return ({"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
    # head_dim 160 (padded to 256): two fp32 (BLOCK_N, 256) accumulators must stay in registers.
    return ({"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
            {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1})


def _mask_arg(key_padding_mask: Tensor | None, like: Tensor) -> tuple[Tensor, int, int]:
    """The mask as uint8 (a view, no copy) and its strides; a dummy when there is none."""
    if key_padding_mask is None:
        return like, 0, 0
    m = key_padding_mask.view(torch.uint8)  # (B, Lk)
    return m, m.stride(0), m.stride(1)


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _empty_out(q: Tensor) -> Tensor:
    """(B, H, Lq, D) output stored as (B, Lq, H, D) memory: merging heads later is a view."""
    B, H, Lq, D = q.shape
    return q.new_empty(B, Lq, H, D).transpose(1, 2)


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float | None
) -> tuple[Tensor, Tensor]:
    """Run the forward kernel; returns (out (B, H, Lq, D), lse (B, H, Lq) float32, log2-based)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    sm_scale = _resolve_scale(scale, D)
    out = _empty_out(q)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    mask, smb, smn = _mask_arg(key_padding_mask, q)
    block_d = max(16, next_power_of_2(D))
    cfg = _fwd_config(block_d, q.device)
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel.on(q.device)[grid](
        q, k, v, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smn,
        H, Lq, Lk, D, sm_scale * _LOG2E,
        HAS_MASK=key_padding_mask is not None, BLOCK_D=block_d, **cfg,
    )
    return out, lse


def attention_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the backward kernels; returns (dq, dk, dv) shaped and strided like q, k, v."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    sm_scale = _resolve_scale(scale, D)
    delta = (out.float() * do.float()).sum(-1).contiguous()  # (B, H, Lq)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask, smb, smn = _mask_arg(key_padding_mask, q)
    block_d = max(16, next_power_of_2(D))
    cfg_kv, cfg_q = _bwd_config(block_d, q.device)
    common = dict(HAS_MASK=key_padding_mask is not None, BLOCK_D=block_d)
    _attn_bwd_dkdv_kernel.on(q.device)[(triton.cdiv(Lk, cfg_kv["BLOCK_N"]), B * H)](
        q, k, v, mask, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), smb, smn,
        H, Lq, Lk, D, sm_scale * _LOG2E, sm_scale, **common, **cfg_kv,
    )
    _attn_bwd_dq_kernel.on(q.device)[(triton.cdiv(Lq, cfg_q["BLOCK_M"]), B * H)](
        q, k, v, mask, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), smb, smn,
        H, Lq, Lk, D, sm_scale * _LOG2E, sm_scale, **common, **cfg_q,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# torch.library registration: opaque ops with fake (shape) implementations, so torch.compile
# traces through them, and autograd wired to the backward op.


@torch.library.custom_op("t2i_engine::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float | None
) -> tuple[Tensor, Tensor]:
    return attention_forward(q, k, v, key_padding_mask, scale)


@_attention_fwd_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float | None):
    B, H, Lq, _ = q.shape
    return _empty_out(q), q.new_empty(B, H, Lq, dtype=torch.float32)


@torch.library.custom_op("t2i_engine::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Tensor | None, scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return attention_backward(do, q, k, v, out, lse, key_padding_mask, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, key_padding_mask, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class TritonAttention(torch.autograd.Function):
    """Autograd for the Triton attention: forward saves (q, k, v, out, lse), backward
    recomputes the probabilities. Its ``setup_context``/``backward`` are also registered as the
    autograd formula of ``t2i_engine::attention_fwd``; ``apply`` returns (out, lse)."""

    @staticmethod
    def forward(q, k, v, key_padding_mask, scale):  # type: ignore[override]
        return torch.ops.t2i_engine.attention_fwd(q, k, v, key_padding_mask, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        q, k, v, key_padding_mask, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.t2i_engine.attention_bwd(
            dout, q, k, v, out, lse, key_padding_mask, ctx.scale
        )
        return dq, dk, dv, None, None


torch.library.register_autograd(
    "t2i_engine::attention_fwd", TritonAttention.backward, setup_context=TritonAttention.setup_context
)


class _EagerAttention(torch.autograd.Function):
    """Eager autograd straight onto the launchers. On an H200 a forward+backward through the custom
    op took 0.87 ms of host time at a tiny shape (SDPA: 0.36 ms), most of it in the backward's
    ``register_autograd`` node by torch.profiler, and autograd filled a zero gradient for ``lse``
    that nothing uses; here ``out`` is the only output. torch.compile traces the custom op
    instead (:func:`triton_attention`)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale):  # type: ignore[override]
        out, lse = attention_forward(q, k, v, key_padding_mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, key_padding_mask, ctx.scale)
        return dq, dk, dv, None, None


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Flash attention through the Triton kernels (CUDA, or CPU under the interpreter).

    Same contract as :func:`t2i_engine.kernels.attention` (no backend choice made here). Under
    ``torch.compile`` it is the ``t2i_engine::attention_fwd`` custom op; in eager mode the
    launchers are called directly (the same kernels and formulas, less host time per call).
    """
    if torch.compiler.is_compiling():
        out, _ = torch.ops.t2i_engine.attention_fwd(q, k, v, key_padding_mask, scale)
        return out
    if not grad_needed(q, k, v):
        return attention_forward(q, k, v, key_padding_mask, scale)[0]
    return _EagerAttention.apply(q, k, v, key_padding_mask, scale)
