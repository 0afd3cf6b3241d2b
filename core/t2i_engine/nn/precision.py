"""Hold the weights autocast would cast on every call in the autocast dtype, once.

Under ``torch.autocast(dtype=bf16)`` every linear and convolution casts its float32 weight and
bias to bf16 on each call; in ``inference_mode`` autocast keeps no cache, so a 20-step SD-1.5
generation casts the whole 860M-parameter UNet 20 times (about a tenth of its bf16 CPU time, and a
weight-sized temporary per layer). An inference task that owns its model can cast those weights
once instead: autocast then finds them already in its dtype and passes them through, so the
arithmetic is the same (the same round-to-nearest cast, done once), and the float32 copies are
freed. Only the layers autocast lowers are touched; norms, embeddings and everything autocast runs
in float32 keep their float32 weights.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AUTOCAST_LAYERS", "cast_autocast_weights"]

AUTOCAST_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
"""Layers whose forward autocast runs in its lower-precision dtype (``linear``, ``conv*``)."""


def cast_autocast_weights(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast the parameters of every :data:`AUTOCAST_LAYERS` layer in ``module`` to ``dtype``.

    Only for a model that from then on runs under ``torch.autocast(dtype=dtype)`` (inference: an
    optimizer would step the low-precision copies). Layers inside ``nn.MultiheadAttention`` are
    left alone (its fused path wants one dtype for all of its weights). Returns the number of
    parameters cast.
    """
    skip = {id(m) for mha in module.modules() if isinstance(mha, nn.MultiheadAttention) for m in mha.modules()}
    count = 0
    for layer in module.modules():
        if isinstance(layer, AUTOCAST_LAYERS) and id(layer) not in skip:
            for p in layer.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    count += p.numel()
    return count
