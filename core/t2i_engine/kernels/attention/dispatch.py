"""attention(): scaled_dot_product_attention, a CPU bf16 path, or the Triton kernel when forced
(bf16 inference on the CPU: :func:`t2i_engine.kernels.attention.cpu.bmm_attention`)."""

from __future__ import annotations


from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from t2i_engine.kernels import cpu_paths
from t2i_engine.kernels._backend import cpu_inference_unsupported, use_triton
from t2i_engine.kernels.attention.cpu import bmm_attention

__all__ = ["attention", "triton_unsupported_reason"]

SUPPORTED_HEAD_DIMS = range(1, 257)  # padded in-kernel to the next power of two, at least 16
_GPU_DTYPES = (torch.float16, torch.bfloat16)


def _triton_ops() -> Any:
    """The Triton module, imported on first use: it imports triton and registers the
    ``t2i_engine::attention_*`` custom ops. A plain import statement, which torch.compile runs while
    tracing (importlib calls would break the graph)."""
    from t2i_engine.kernels.attention import triton

    return triton


def triton_unsupported_reason(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None when it can.

    CUDA tensors must be float16 or bfloat16 (float32 stays on SDPA, which runs it on tensor
    cores as TF32 only when asked); CPU tensors (interpreter) may be float32 or float16.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (B, heads, L, head_dim)"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    allowed = _GPU_DTYPES if q.device.type == "cuda" else (torch.float32, torch.float16)
    if q.dtype not in allowed:
        return f"dtype {q.dtype} is not supported on {q.device.type}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"head_dim {q.shape[-1]} (k {k.shape[-1]}, v {v.shape[-1]}) is not supported"
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape:
        return "q, k, v must share batch and heads, and k, v their shape"
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2])
    ):
        return "key_padding_mask must be bool (B, Lk)"
    if max(q.numel(), k.numel()) >= 2**31:
        return "more than 2**31 elements (32-bit offsets)"
    return None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product attention, ``softmax(q k^T * scale) v``, over the last two dims.

    Args:
        q: queries (B, heads, Lq, head_dim); any strides, e.g. a transposed view of a
            (B, Lq, heads, head_dim) projection.
        k: keys (B, heads, Lk, head_dim).
        v: values (B, heads, Lk, head_dim).
        key_padding_mask: (B, Lk) bool (or 0/1 integers), True = attend to this key; None
            attends to all.
            A query with no key kept gets zeros.
        scale: score scale; ``head_dim ** -0.5`` when None.

    Returns:
        (B, heads, Lq, head_dim) in q's dtype. The Triton path stores it as
        (B, Lq, heads, head_dim) memory, so merging the heads afterwards is a view.

    Runs the Triton flash kernel for CUDA float16/bfloat16 inputs when ``T2I_KERNELS=triton``
    (opt-in: SDPA was faster on an H200, docs/kernels.md); bf16 CPU inference without a
    mask runs :func:`~t2i_engine.kernels.attention.cpu.bmm_attention` (about twice as fast as
    SDPA's CPU kernel in bf16 on the machine of docs/benchmarks.md; on the machines where it is not,
    :mod:`t2i_engine.kernels.cpu_paths` turns it off); everything else runs ``F.scaled_dot_product_attention``.
    ``T2I_KERNELS`` overrides the choice (``torch``: always SDPA).
    """
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0  # 0/1 integer masks (tokenizer output)
    if use_triton("attention", q.device, triton_unsupported_reason(q, k, v, key_padding_mask)):
        return _triton_ops().triton_attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale)
    if (
        key_padding_mask is None
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.dim() == 4
        and cpu_inference_unsupported(q, k, v) is None
        and cpu_paths.enabled("attention_bf16_long" if q.shape[2] * k.shape[2] > cpu_paths.LONG_SCORES
                              else "attention_bf16_short")
    ):
        return bmm_attention(q, k, v, scale=scale)
    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
