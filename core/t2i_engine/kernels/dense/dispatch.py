"""linear() and conv2d(): oneDNN for float32 CPU inference, PyTorch everywhere else.

oneDNN runs an op when all of these hold (:func:`onednn_unsupported_reason` says which fails):

* ``T2I_KERNELS`` is not ``torch`` (there is no Triton dense kernel: ``triton`` acts as ``auto``);
* PyTorch was built with oneDNN and ``torch.backends.mkldnn.enabled`` is on;
* every tensor is a float32 CPU tensor and CPU autocast is off (under bf16 autocast PyTorch already
  runs these ops through oneDNN);
* no gradient is needed (``torch.no_grad``/``inference_mode``, or nothing requires grad): the
  oneDNN ops have no autograd formula (a training linear takes :class:`OneDNNLinear`, below);
* not inside ``torch.compile`` (Inductor makes its own choice);
* the path is on for this machine (:mod:`t2i_engine.kernels.cpu_paths`: on unless the machine's
  timing found it no faster than PyTorch's op);
* linear: ``x`` is contiguous with at least :data:`MIN_ROWS` rows; conv2d: a 1x1 kernel with
  stride 1, no padding, no dilation and one group (3x3 convolutions already go to oneDNN).

A float32 3x3 convolution with enough output pixels and channels runs as Winograd F(4x4, 3x3)
(:mod:`t2i_engine.kernels.dense.winograd`: a quarter of the GEMM work; in training too, from more
output pixels, differentiated by autograd) where
:func:`winograd_unsupported_reason` allows and
:func:`~t2i_engine.kernels.dense.winograd.winograd_applies` says the shape gains, whether or not
its weight is packed (a packed one is read back to a plain copy for the call).

A CPU convolution that needs a gradient (training) at low resolution runs as unfold + GEMM
(:mod:`t2i_engine.kernels.dense.gemm_conv`) where :func:`gemm_conv_unsupported_reason` allows and
the shape is one the GEMM wins on (:func:`~t2i_engine.kernels.dense.gemm_conv.gemm_conv_applies`).

A linear whose weight was packed for inference (:func:`pack_linear_weight`, by
:func:`t2i_engine.nn.cpu_inference.pack_weights`) runs through :func:`packed_linear`, whatever the
rows: oneDNN's GEMM without the per-call reorder of a plain weight.

A float32 CPU linear that needs a gradient (training) runs through :class:`OneDNNLinear`
instead, whose backward GEMMs are oneDNN's too, under the same conditions but autograd's
(:func:`onednn_training_unsupported_reason`).

The result equals the reference up to float32 rounding (a different summation order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from t2i_engine.kernels import cpu_paths
from t2i_engine.kernels._backend import cpu_inference_unsupported, cpu_path_unsupported, grad_needed
from t2i_engine.kernels.dense import reference
from t2i_engine.kernels.dense.gemm_conv import gemm_conv2d, gemm_conv_applies, pair as _pair
from t2i_engine.kernels.dense.winograd import MIN_TILES, MIN_TRAIN_TILES, winograd_applies, winograd_conv2d

__all__ = ["MIN_ROWS", "OneDNNLinear", "conv2d", "linear", "onednn_available", "onednn_training_unsupported_reason",
           "default_pack_input", "gemm_conv_unsupported_reason", "onednn_unsupported_reason", "pack_conv_weight",
           "pack_linear_weight", "packed_conv2d", "packed_linear", "winograd_unsupported_reason"]

MIN_ROWS = 8  # below this (a timestep embedding's batch) the call overhead outweighs the gain


def onednn_available() -> bool:
    """True when PyTorch was built with oneDNN and ``torch.backends.mkldnn.enabled`` is on."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _float32_cpu_reason(tensors: tuple[Tensor | None, ...]) -> str | None:
    """Why these are not float32 CPU tensors outside CPU autocast, or None."""
    if any(t is not None and (t.device.type != "cpu" or t.dtype != torch.float32) for t in tensors):
        return "not all tensors are float32 CPU tensors"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    return None


def _dtype_device_autocast_reason(tensors: tuple[Tensor | None, ...]) -> str | None:
    if not onednn_available():
        return "PyTorch has no oneDNN here (or torch.backends.mkldnn.enabled is off)"
    return _float32_cpu_reason(tensors)


def onednn_unsupported_reason(*tensors: Tensor | None) -> str | None:
    """Why oneDNN's dense ops should not take these tensors in inference, or None when they can.

    Covers what :func:`linear` and :func:`conv2d` share (backend, build, dtype, device, autocast,
    autograd, compile, this machine's choice); the shape conditions are checked by each op.
    """
    reason = cpu_inference_unsupported(*tensors) or _dtype_device_autocast_reason(tensors)
    if reason is None and not cpu_paths.enabled("dense_fp32"):
        return "the oneDNN dense path is off on this machine (t2i_engine.kernels.cpu_paths)"
    return reason


def onednn_training_unsupported_reason(*tensors: Tensor | None) -> str | None:
    """Why a float32 linear that needs a gradient should not run through :class:`OneDNNLinear`
    (forward and both backward GEMMs in oneDNN), or None when it can: outside ``torch.compile``,
    ``T2I_KERNELS`` not ``torch``, float32 CPU tensors without autocast, and the path on for this
    machine (``dense_fp32_train`` of :mod:`t2i_engine.kernels.cpu_paths`)."""
    reason = cpu_path_unsupported() or _dtype_device_autocast_reason(tensors)
    if reason is None and not cpu_paths.enabled("dense_fp32_train"):
        return "the oneDNN training path is off on this machine (t2i_engine.kernels.cpu_paths)"
    return reason


def gemm_conv_unsupported_reason(*tensors: Tensor | None) -> str | None:
    """Why a CPU convolution that needs a gradient should not run as unfold + GEMM, or None when
    it can: outside ``torch.compile``, ``T2I_KERNELS`` not ``torch``, CPU tensors, float32 without
    autocast (path ``conv_gemm_train_fp32`` of :mod:`t2i_engine.kernels.cpu_paths`) or bf16
    (bf16 tensors, or float32 ones under bf16 CPU autocast: ``conv_gemm_train_bf16``)."""
    reason = cpu_path_unsupported()
    if reason is not None:
        return reason
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return "not all tensors are CPU tensors"
    dtypes = {t.dtype for t in tensors if t is not None}
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or not dtypes <= {torch.float32, torch.bfloat16}:
            return "CPU autocast to a dtype other than bf16, or inputs neither float32 nor bf16"
        path = "conv_gemm_train_bf16"
    elif dtypes == {torch.float32}:
        path = "conv_gemm_train_fp32"
    elif dtypes == {torch.bfloat16}:
        path = "conv_gemm_train_bf16"
    else:
        return "tensors neither all float32 nor all bf16"
    if not cpu_paths.enabled(path):
        return f"path {path} is off on this machine (t2i_engine.kernels.cpu_paths)"
    return None


def winograd_unsupported_reason(*tensors: Tensor | None) -> str | None:
    """Why a 3x3 convolution should not run as Winograd F(4x4, 3x3), or None when it can: outside
    ``torch.compile``, ``T2I_KERNELS`` not ``torch``, float32 CPU tensors without CPU autocast (the
    transforms amplify rounding beyond what bf16 holds), and the path on for this machine
    (:mod:`t2i_engine.kernels.cpu_paths`): ``conv_winograd_fp32`` in inference,
    ``conv_winograd_train_fp32`` where a gradient is needed."""
    reason = cpu_path_unsupported() or _float32_cpu_reason(tensors)
    if reason is not None:
        return reason
    path = "conv_winograd_train_fp32" if grad_needed(*tensors) else "conv_winograd_fp32"
    if not cpu_paths.enabled(path):
        return f"path {path} is off on this machine (t2i_engine.kernels.cpu_paths)"
    return None


def _winograd(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any,
              groups: int) -> bool:
    if winograd_unsupported_reason(x, weight, bias) is not None:  # first: it checks torch.compile
        return False
    min_tiles = MIN_TRAIN_TILES if grad_needed(x, weight, bias) else MIN_TILES
    return winograd_applies(x, weight, stride, padding, dilation, groups, min_tiles=min_tiles)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` for a contiguous 2-D float32 CPU ``x`` whose forward GEMM runs
    through oneDNN, and its backward GEMMs (``grad @ weight`` and ``grad.T @ x``) too where
    ``onednn_backward`` (on transposed copies; else ``torch.mm``, as ``F.linear``'s autograd):
    the same float32 arithmetic as ``F.linear``'s, in another summation order. Once
    differentiable."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,  # noqa: D102
                onednn_backward: bool = True) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.onednn_backward = bias is not None, onednn_backward
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # noqa: D102
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        if ctx.onednn_backward:
            gx = _onednn_linear(grad, weight.t().contiguous(), None) if ctx.needs_input_grad[0] else None
            gw = _onednn_linear(grad.t().contiguous(), x.t().contiguous(), None) if ctx.needs_input_grad[1] else None
        else:
            gx = grad.mm(weight) if ctx.needs_input_grad[0] else None
            gw = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for ``x`` of shape ``(..., in)`` and ``weight`` ``(out, in)``.

    oneDNN's ``mkldnn::_linear_pointwise`` where it applies (see the module doc); with a gradient
    needed, :class:`OneDNNLinear` where :func:`onednn_training_unsupported_reason` allows;
    ``F.linear`` otherwise; a packed weight (:func:`pack_linear_weight`) through :func:`packed_linear`.
    """
    if weight.is_mkldnn:
        return packed_linear(x, weight, bias)
    if x.dim() >= 2 and x.is_contiguous() and weight.is_contiguous() and x.numel() // max(x.shape[-1], 1) >= MIN_ROWS:
        if onednn_unsupported_reason(x, weight, bias) is None:
            return _onednn_linear(x, weight, bias)
        if grad_needed(x, weight, bias) and onednn_training_unsupported_reason(x, weight, bias) is None:
            out = OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias,
                                     cpu_paths.enabled("dense_fp32_train_backward"))
            return out.view(*x.shape[:-1], weight.shape[0])
    return reference.linear(x, weight, bias)


PACK_LINEAR_ROWS = 128
"""The row count a linear weight is packed for. On the Zen 4 of docs/benchmarks.md oneDNN's layout
did not depend on it: weights packed for 2 to 2048 rows ran 2 to 2048 rows in the same time."""


def pack_linear_weight(weight: Tensor) -> Tensor:
    """``weight`` ``(out, in)`` (float32 or bf16 CPU) reordered once into the blocked layout oneDNN's
    GEMM takes; run it with :func:`packed_linear`. A plain weight is reordered on every call,
    which for the UNet's weight-bound linears (a few hundred rows against 1280 x 10240 weights at
    128 px) is a large part of the call."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_LINEAR_ROWS)


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` by a weight from :func:`pack_linear_weight` (inference only), for
    ``x`` of shape ``(..., in)``. ``x`` and ``bias`` are cast to the weight's dtype, as autocast
    would; the output has that dtype."""
    x, bias = _packed_inputs("packed_linear", x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _packed_inputs(op: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``x`` (contiguous) and ``bias`` in a packed weight's dtype, as autocast would cast them;
    refused where a gradient is needed (a packed weight has no autograd)."""
    if grad_needed(x, bias):
        raise RuntimeError(f"{op}: this layer's weight is packed for inference (no autograd)")
    return x.to(weight.dtype).contiguous(), None if bias is None else bias.to(weight.dtype)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | tuple[int, int] = 1,
           padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1,
           groups: int = 1) -> Tensor:
    """2-D convolution; a pointwise (1x1) float32 convolution runs through oneDNN where it
    applies (see the module doc), a weight packed by :func:`pack_conv_weight` through
    :func:`packed_conv2d`, a low-resolution training one as unfold + GEMM (:func:`gemm_conv2d`
    where :func:`gemm_conv_unsupported_reason` and ``gemm_conv_applies`` allow), every other
    through ``F.conv2d``; a float32 3x3 one with enough output pixels as Winograd F(4x4, 3x3)
    (:func:`winograd_unsupported_reason`, ``winograd_applies``), packed or not."""
    if _winograd(x, weight, bias, stride, padding, dilation, groups):
        return winograd_conv2d(x, weight.to_dense() if weight.is_mkldnn else weight, bias)
    if weight.is_mkldnn:
        return packed_conv2d(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups)
    pointwise = (
        x.dim() == 4
        and x.numel() > 0
        and weight.shape[-2:] == (1, 1)
        and groups == 1
        and _pair(stride) == (1, 1)
        and padding in (0, (0, 0), [0, 0], "valid")
        and _pair(dilation) == (1, 1)
    )
    if pointwise and onednn_unsupported_reason(x, weight, bias) is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
    if (grad_needed(x, weight, bias) and gemm_conv_applies(x, weight, stride, padding, dilation, groups)
            and gemm_conv_unsupported_reason(x, weight, bias) is None):
        return gemm_conv2d(x, weight, bias, stride, padding, dilation)  # type: ignore[arg-type]
    return reference.conv2d(x, weight, bias, stride, padding, dilation, groups)


PACK_PROBE_SIZE = 16
"""The side of the input a weight is first packed for (:func:`pack_conv_weight` without
``input_size``); :class:`t2i_engine.nn.ops.Conv2d` repacks for the input it actually gets."""


def default_pack_input(weight: Tensor, groups: int) -> tuple[int, int, int, int]:
    """The input shape a weight is packed for until a call brings its own: ``(2, C, 16, 16)``."""
    return (2, weight.shape[1] * groups, PACK_PROBE_SIZE, PACK_PROBE_SIZE)


def pack_conv_weight(weight: Tensor, *, stride: tuple[int, ...], padding: tuple[int, ...],
                     dilation: tuple[int, ...], groups: int, input_size: tuple[int, ...] | None = None) -> Tensor:
    """``weight`` (float32 or bf16 CPU, plain or already packed) reordered into the blocked layout
    oneDNN's convolution takes for inputs of shape ``input_size`` ``(N, C, H, W)`` (default
    ``(2, C, 16, 16)``).

    A convolution on a plain weight reorders it into that layout on every call: for the deep
    levels of a UNet (1280 channels at 4x4 to 16x16 pixels) that reorder costs as much as the
    convolution itself. The layout depends on the input's shape on some CPUs: with AVX2 only
    (AMD Zen 3) oneDNN's brgemm convolution takes 24-row blocks at 4x4 and 16x16 but 32-row blocks
    at 2x2, and a weight packed for another shape is reordered again on every call by a slow
    generic reorder (1.2 s for 1280x1280x3x3, 20x the convolution). So pack for the shape the
    layer will see (:class:`t2i_engine.nn.ops.Conv2d` repacks when its input shape changes). Run a
    packed weight with :func:`packed_conv2d`.
    """
    if input_size is None:
        input_size = default_pack_input(weight, groups)
    # a packed weight is reordered from its own layout: no plain copies in between (a repack of
    # every deep layer at a new resolution once tripled those layers' weight memory in flight)
    source = weight if weight.is_mkldnn else weight.detach().to_mkldnn()
    return torch._C._nn.mkldnn_reorder_conv2d_weight(source, list(padding), list(stride),
                                                      list(dilation), groups, list(input_size))


def packed_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...],
                  padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> Tensor:
    """Convolution by a weight from :func:`pack_conv_weight` (inference only).

    ``x`` and ``bias`` are cast to the weight's dtype, as autocast would; the output is a contiguous
    NCHW tensor of that dtype.
    """
    x, bias = _packed_inputs("packed_conv2d", x, weight, bias)
    y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(padding), list(stride), list(dilation),
                                                groups, "none", [], "")
    return y.contiguous()
