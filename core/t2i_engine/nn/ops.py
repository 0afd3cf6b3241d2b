"""The one adapter between the nn blocks and the engine's compute ops.

Every block in :mod:`t2i_engine.nn` calls :func:`attention` and :func:`group_norm` from here,
and builds its dense layers from :class:`Linear` and :class:`Conv2d` here, never torch directly,
so that the kernels of :mod:`t2i_engine.kernels` (Triton on CUDA, oneDNN for float32 dense layers
on the CPU, the best PyTorch path elsewhere) are picked up in one place. While the kernels package is not
importable the plain PyTorch paths below are used; they are the same maths.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.kernels._backend import grad_needed  # torch only: importable whatever the kernels
from t2i_engine.utils.cpu_memory import release_free_memory

Activation = Literal["silu"] | None


def _kernels():  # noqa: ANN202 - the module or None
    try:
        from t2i_engine import kernels
    except ImportError:
        return None
    if not all(hasattr(kernels, op) for op in ("attention", "group_norm", "linear", "conv2d")):
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


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` over the last dim (oneDNN for float32 CPU inference)."""
    kernels = _kernels()
    return kernels.linear(x, weight, bias) if kernels is not None else F.linear(x, weight, bias)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | tuple[int, int] = 1,
           padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1,
           groups: int = 1) -> Tensor:
    """2-D convolution (1x1 float32 convolutions on CPU inference go through oneDNN)."""
    kernels = _kernels()
    if kernels is not None:
        return kernels.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose forward runs :func:`linear`
    (a weight packed by :func:`t2i_engine.nn.cpu_inference.pack_linear_weights` included)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) whose forward runs :func:`conv2d`.

    Zero padding only; other ``padding_mode`` values fall back to ``nn.Conv2d.forward``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        if self.weight.is_mkldnn:
            self._fit_packing(tuple(x.shape))
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _fit_packing(self, shape: tuple[int, ...]) -> None:
        """Repack a packed weight (:func:`t2i_engine.nn.cpu_inference.pack_conv_weights`) for
        inputs of ``shape`` when it was packed for another: oneDNN's weight layout can depend on
        the input's shape, and a mismatched one is reordered again on every call. One copy is
        kept (the old one's pages go back to the system); a sampling run, whose shapes do not
        change, repacks each layer once."""
        if getattr(self, "packed_for", None) == shape:
            return
        from t2i_engine.kernels.dense.dispatch import pack_conv_weight

        packed = pack_conv_weight(self.weight, stride=self.stride, padding=self.padding, dilation=self.dilation,
                                  groups=self.groups, input_size=shape)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.packed_for = shape
        # the old packed copy is free now, but generation keeps freed blocks in the heap
        # (retain_freed_memory) and a run's repacks left holes that no later block filled: SD-1.5
        # at 128 px peaked at about 237 MiB above its weights with them, 161 MiB without
        release_free_memory()


def add_(out: Tensor, other: Tensor) -> Tensor:
    """``out + other``, written into ``out`` where that is safe: no gradient is needed, ``out`` is
    contiguous, and the sum has ``out``'s shape and dtype (under autocast a bf16 ``out`` plus a
    float32 ``other`` is float32). ``out`` must be an intermediate the caller owns (a fresh layer
    output). Saves one activation-sized buffer per residual connection in inference. Under
    ``torch.compile`` it is the plain sum (Inductor plans buffers itself)."""
    if (
        not torch.compiler.is_compiling()
        and not grad_needed(out, other)
        and out.is_contiguous()
        and torch.result_type(out, other) == out.dtype
        and torch.broadcast_shapes(out.shape, other.shape) == out.shape
    ):
        return out.add_(other)
    return out + other
