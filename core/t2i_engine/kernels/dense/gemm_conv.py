"""Training convolutions at low resolution as one GEMM over unfolded patches (CPU).

PyTorch's CPU convolution reorders the weight into oneDNN's blocked layout on every call (measured
for the forward; the backward's share is inferred); inference avoids it by packing once (:func:`t2i_engine.kernels.dense.dispatch.pack_conv_weight`),
but a training weight changes every step. At the deep levels of a UNet (1280 channels at 2x2 to
8x8 pixels, a guidance-sized batch) those reorders cost more than the arithmetic: on the AMD
EPYC (Zen 4) of docs/benchmarks.md a 1280 -> 1280 3x3 convolution at 2x2 took 167 ms forward and
backward, against 52 ms as unfold + ``F.linear``, whose weight is the plain ``(out, in * kh * kw)``
view and whose backward (``F.fold`` and two GEMMs) autograd derives. With more output pixels the
unfolded patches (``kh * kw`` copies of the input) cost more than the reorders save, so the path
takes only convolutions with few output rows (:func:`gemm_conv_applies`).

The result equals the convolution's up to rounding (the same products, summed in another order;
tests/kernels/test_gemm_conv.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MAX_ROWS", "WIDE_CHANNELS", "WIDE_MAX_ROWS", "gemm_conv2d", "gemm_conv_applies", "output_rows", "pair"]

MAX_ROWS = 64
"""A convolution whose batch x output pixels is at most this takes the GEMM whatever its width
(2x2 and 4x4 outputs at a batch of 2 or 4)."""
WIDE_MAX_ROWS = 128
"""Up to this many output rows when it has at least :data:`WIDE_CHANNELS` output channels
(8x8 at a batch of 2: 1280 -> 1280 gained 157 against 264 ms, 640 -> 640 lost 39 against 36)."""
WIDE_CHANNELS = 1024


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    """A convolution's int-or-pair argument (stride, padding, dilation) as a pair of ints."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _output_hw(x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
               dilation: tuple[int, int]) -> tuple[int, int]:
    return (_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0]),
            _output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1]))


def output_rows(x: Tensor, weight: Tensor, stride: int | tuple[int, int], padding: int | tuple[int, int],
                dilation: int | tuple[int, int]) -> int:
    """Batch x output pixels of the convolution: the GEMM's row count."""
    ho, wo = _output_hw(x, weight, pair(stride), pair(padding), pair(dilation))
    return x.shape[0] * ho * wo


def gemm_conv_applies(x: Tensor, weight: Tensor, stride: int | tuple[int, int] | str,
                      padding: int | tuple[int, int] | str, dilation: int | tuple[int, int] | str,
                      groups: int) -> bool:
    """True for the shapes the GEMM wins on: a 4-D input, one group, a kernel larger than 1x1,
    numeric padding, and at most :data:`MAX_ROWS` output rows (:data:`WIDE_MAX_ROWS` when the
    layer has :data:`WIDE_CHANNELS` output channels or more)."""
    if x.dim() != 4 or weight.dim() != 4 or groups != 1 or x.numel() == 0 or weight.shape[2:] == (1, 1):
        return False
    if any(isinstance(v, str) for v in (stride, padding, dilation)):
        return False
    rows = output_rows(x, weight, stride, padding, dilation)  # type: ignore[arg-type]
    if rows <= 0:
        return False
    return rows <= MAX_ROWS or (rows <= WIDE_MAX_ROWS and weight.shape[0] >= WIDE_CHANNELS)


def gemm_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | tuple[int, int] = 1,
                padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` (one group, zero padding) as
    ``F.unfold`` + ``F.linear``, differentiable by autograd. Under CPU autocast ``x`` is cast to
    the autocast dtype before it is unfolded (``F.linear`` would cast the nine-fold copy)."""
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    n, k = x.shape[0], weight.shape[0]
    ho, wo = _output_hw(x, weight, stride, padding, dilation)
    if torch.is_autocast_enabled("cpu"):
        x = x.to(torch.get_autocast_dtype("cpu"))
    cols = F.unfold(x, tuple(weight.shape[2:]), dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    y = F.linear(cols.transpose(1, 2), weight.reshape(k, -1), bias)  # (N, L, out)
    return y.transpose(1, 2).reshape(n, k, ho, wo).contiguous()  # NCHW, as F.conv2d returns
