"""Pack a model's convolution and linear weights into oneDNN's layout once, for CPU inference.

A CPU convolution on a plain ``(out, in, kh, kw)`` weight makes oneDNN reorder the weight into
its blocked layout on every call. In a UNet's deep levels (640 to 2560 input channels at 4x4 to
16x16 pixels) the weights are much larger than the activations, and that reorder, plus the
weight-sized temporary it allocates, costs about as much as the convolution: packing them once
made the SD-1.5 UNet forward at 256x256 21-22 % faster in float32 and in bf16 on the machine of
docs/benchmarks.md (float32 results are equal to rounding; bf16 within bf16 rounding). Layers with
fewer channels and larger activations gain nothing (320 channels at 32x32, the UNet's first level
at 256 px) or lose (256 channels at 256x256, the KL decoder's size: 12 % slower), so layers below
``min_in_channels`` stay plain. 1x1 convolutions are packed by the same rule (a 2560 -> 1280 1x1
at 2x2 ran in 0.6 ms packed against 8.1 ms through ``F.conv2d`` on the Zen 4 of docs/benchmarks.md).

Linear layers are the same story in another op: at 128 px the UNet's feed-forward and attention
projections multiply a few hundred rows by weights up to 1280 x 10240, and oneDNN on a packed
weight took 0.53-0.80x ``F.linear``'s time in float32 (MKL) and 0.76-0.99x in bf16 on that Zen 4.
:func:`pack_linear_weights` packs every :class:`t2i_engine.nn.ops.Linear`.

oneDNN's convolution layout can depend on the input's shape (on AVX2-only CPUs it does): a packed
:class:`t2i_engine.nn.ops.Conv2d` repacks its weight when its input shape changes, so each layer
runs the layout of the shape it sees (once per shape change: a sampling run repacks once).

A packed model is for inference only: the weights become oneDNN tensors (no autograd, no
``load_state_dict``, no ``.to(device)``); its ``state_dict()`` still gives plain tensors (a
dense copy per packed weight), for the code that reads a loaded model's weights (a ControlNet
difference file adds them). Each dtype's packing is kept only where this machine's timing found
it faster (:mod:`t2i_engine.kernels.cpu_paths`). The inference tasks pack the denoiser of the
model they own (:func:`t2i_engine.tasks.common.prepare_for_inference`, via :func:`pack_weights`).

An autoencoder is the other case: few channels, large activations (256 channels at 128x128 in
the KL decoder at 256 px), no weight worth packing. In bf16 its time goes to oneDNN reordering
each NCHW activation into its blocked layout and back, around every convolution: on the Intel
Xeon with AMX of docs/benchmarks.md those copies were 38 % of diffusers' bf16 decode (3 % in
``channels_last``), and the
same decoder in ``channels_last`` took 0.41x the NCHW time. :func:`channels_last_bf16` converts a
module whose convolutions run in bf16 on the CPU, where this machine's timing keeps that
(``channels_last_bf16``); float32 gains nothing from it (0.92-1.04x there).
"""

from __future__ import annotations

import torch
from torch import nn

from t2i_engine.kernels import cpu_paths
from t2i_engine.kernels._backend import cpu_path_unsupported
from t2i_engine.kernels.dense.dispatch import default_pack_input, onednn_available, pack_conv_weight, pack_linear_weight
from t2i_engine.nn import ops

__all__ = ["PACKABLE_DTYPES", "channels_last_bf16", "pack_conv_weights", "pack_linear_weights", "pack_weights"]

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
_PACK_PATH = {torch.float32: "conv_pack_fp32", torch.bfloat16: "conv_pack_bf16"}
_LINEAR_PACK_PATH = {torch.float32: "linear_pack_fp32", torch.bfloat16: "linear_pack_bf16"}


def pack_weights(module: nn.Module) -> int:
    """Pack what pays on this machine in ``module``: its deep convolutions
    (:func:`pack_conv_weights`) and its linears (:func:`pack_linear_weights`). Returns the number
    of layers packed."""
    return pack_conv_weights(module) + pack_linear_weights(module)


def _packable(weight: torch.Tensor, paths: dict[torch.dtype, str]) -> bool:
    return (cpu_path_unsupported() is None and not weight.is_mkldnn and weight.device.type == "cpu"
            and weight.dtype in PACKABLE_DTYPES and cpu_paths.enabled(paths[weight.dtype]))


def _dense_state_dict(module: nn.Module, state: dict, prefix: str, *_: object) -> None:
    """``state_dict`` hook of a packed layer: its weight as a plain tensor."""
    key = prefix + "weight"
    if key in state and state[key].is_mkldnn:
        state[key] = state[key].to_dense()


def _set_packed(layer: nn.Module, packed: torch.Tensor) -> None:
    layer.weight = nn.Parameter(packed, requires_grad=False)
    if not getattr(layer, "_dense_state_dict_hooked", False):
        layer._register_state_dict_hook(_dense_state_dict)
        layer._dense_state_dict_hooked = True


def pack_linear_weights(module: nn.Module) -> int:
    """Pack the weight of every :class:`t2i_engine.nn.ops.Linear` in ``module`` that runs on the
    CPU in float32 or bf16, where this machine's timing kept that dtype's packing
    (``linear_pack_fp32`` / ``linear_pack_bf16``). Returns the number of layers packed. Cast
    weights first under autocast, as for :func:`pack_conv_weights`."""
    if not onednn_available():
        return 0
    count = 0
    for layer in module.modules():
        if isinstance(layer, ops.Linear) and _packable(layer.weight, _LINEAR_PACK_PATH):
            _set_packed(layer, pack_linear_weight(layer.weight))
            count += 1
    return count


def pack_conv_weights(module: nn.Module, *, min_in_channels: int = 640) -> int:
    """Pack the weight of every :class:`t2i_engine.nn.ops.Conv2d` in ``module`` that runs on the
    CPU in float32 or bf16 with at least ``min_in_channels`` input channels (zero padding, any
    kernel size). Returns the number of layers packed.

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
            or not _packable(w, _PACK_PATH)
            or layer.in_channels < min_in_channels
            or layer.padding_mode != "zeros"
            or isinstance(layer.padding, str)
        ):
            continue
        shape = default_pack_input(w, layer.groups)
        packed = pack_conv_weight(w, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                  groups=layer.groups, input_size=shape)
        _set_packed(layer, packed)
        layer.packed_for = shape  # ops.Conv2d repacks when a call brings another shape
        count += 1
    return count


def channels_last_bf16(module: nn.Module) -> bool:
    """Put ``module`` in ``channels_last`` memory format (its 4-D weights, and so the activations
    its convolutions return) when it has convolutions that run on the CPU in bf16 (weights already
    cast, as :func:`t2i_engine.nn.precision.cast_autocast_weights` does under autocast) and this
    machine's timing kept that (path ``channels_last_bf16``). Returns whether it did. The results
    equal the NCHW ones up to bf16 rounding; outputs may come back in ``channels_last`` strides."""
    convs = [m.weight for m in module.modules() if isinstance(m, nn.Conv2d)]
    if (not convs or cpu_path_unsupported() is not None or not cpu_paths.enabled("channels_last_bf16")
            or any(w.is_mkldnn or w.device.type != "cpu" or w.dtype != torch.bfloat16 for w in convs)):
        return False
    module.to(memory_format=torch.channels_last)
    return True
