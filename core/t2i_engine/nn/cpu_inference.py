"""Pack a model's convolution weights into oneDNN's layout once, for CPU inference.

A CPU convolution on a plain ``(out, in, kh, kw)`` weight makes oneDNN reorder the weight into
its blocked layout on every call. In a UNet's deep levels (640 to 2560 input channels at 4x4 to
16x16 pixels) the weights are much larger than the activations, and that reorder, plus the
weight-sized temporary it allocates, costs about as much as the convolution: packing them once
made the SD-1.5 UNet forward at 256x256 21-22 % faster in float32 and in bf16 on the machine of
docs/benchmarks.md (float32 results are equal to rounding; bf16 within bf16 rounding). Layers with
fewer channels and larger activations gain nothing (320 channels at 32x32, the UNet's first level
at 256 px) or lose (256 channels at 256x256, the KL decoder's size: 12 % slower), so layers below
``min_in_channels`` stay plain.

oneDNN's layout can depend on the input's shape (on AVX2-only CPUs it does): a packed
:class:`t2i_engine.nn.ops.Conv2d` repacks its weight when its input shape changes, so each layer
runs the layout of the shape it sees (once per shape change: a sampling run repacks once).

A packed model is for inference only: the weights become oneDNN tensors (no autograd, no
``state_dict`` to save, no ``.to(device)``). The inference tasks pack the denoiser of the model they
own (:func:`t2i_engine.tasks.common.prepare_for_inference`).
"""

from __future__ import annotations

import torch
from torch import nn

from t2i_engine.kernels import cpu_paths
from t2i_engine.kernels.dense.dispatch import default_pack_input, onednn_available, pack_conv_weight
from t2i_engine.nn import ops

__all__ = ["PACKABLE_DTYPES", "pack_conv_weights"]

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
_PACK_PATH = {torch.float32: "conv_pack_fp32", torch.bfloat16: "conv_pack_bf16"}


def pack_conv_weights(module: nn.Module, *, min_in_channels: int = 640) -> int:
    """Pack the weight of every :class:`t2i_engine.nn.ops.Conv2d` in ``module`` that runs on the
    CPU in float32 or bf16 with at least ``min_in_channels`` input channels (zero padding, any
    kernel size but 1x1, which has its own oneDNN path). Returns the number of layers packed.

    Needs PyTorch with oneDNN (else packs nothing); a dtype whose packing this machine's timing
    found no faster (:mod:`t2i_engine.kernels.cpu_paths`) stays plain. Cast weights first
    (:func:`t2i_engine.nn.precision.cast_autocast_weights`) when the model runs under autocast: a
    packed convolution computes in its weight's dtype.
    """
    if not onednn_available():
        return 0
    count = 0
    for layer in module.modules():
        w = layer.weight if isinstance(layer, ops.Conv2d) else None
        if (
            w is None
            or w.is_mkldnn
            or w.device.type != "cpu"
            or w.dtype not in PACKABLE_DTYPES
            or not cpu_paths.enabled(_PACK_PATH[w.dtype])
            or layer.in_channels < min_in_channels
            or layer.kernel_size == (1, 1)
            or layer.padding_mode != "zeros"
            or isinstance(layer.padding, str)
        ):
            continue
        shape = default_pack_input(w, layer.groups)
        packed = pack_conv_weight(w, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                  groups=layer.groups, input_size=shape)
        layer.weight = nn.Parameter(packed, requires_grad=False)
        layer.packed_for = shape  # ops.Conv2d repacks when a call brings another shape
        count += 1
    return count
