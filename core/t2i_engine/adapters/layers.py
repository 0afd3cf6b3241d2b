"""The LoRA layer: a low-rank update beside a frozen Linear or Conv2d.

LoRA (Hu et al. 2021, arXiv 2106.09685) adds ``up(down(x)) * scale`` to a layer's output, with
``down`` mapping the input to ``rank`` features and ``up`` mapping them back. The scale follows
kohya-ss ``networks/lora.py`` (the law every community file assumes):

    scale = multiplier * alpha / rank        (alpha absent or 0: alpha = rank, so scale = multiplier)

PEFT's ``lora_alpha / r`` is the same law; its rsLoRA variant (``alpha / sqrt(r)``) is expressed
by the loaders as an equivalent ``alpha * sqrt(r)``. For convolutions ``down`` has the base
layer's kernel, stride, padding and dilation and ``up`` is 1x1 (kohya's LoCon layout), so the
update equals one convolution with the weight ``up @ down`` and can be merged exactly.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@attrs.frozen
class ConvShape:
    """Geometry of a convolution a LoRA must reproduce (the base layer's)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvShape:
        """The geometry of ``conv`` (grouped convolutions have no LoRA layout and are refused)."""
        if conv.groups != 1:
            raise ValueError(f"LoRA needs an ungrouped convolution; this one has groups={conv.groups}")
        return cls(tuple(conv.kernel_size), tuple(conv.stride), conv.padding if isinstance(conv.padding, str)
                   else tuple(conv.padding), tuple(conv.dilation))  # type: ignore[arg-type]


class LoRA(nn.Module):
    """One low-rank update ``up(down(dropout(x))) * multiplier * alpha / rank``.

    ``conv`` given: ``down`` is a ``Conv2d`` with that geometry and ``up`` a 1x1 ``Conv2d``;
    otherwise both are ``Linear`` (no bias). Fresh layers start as kohya and PEFT do: ``down``
    Kaiming-uniform (a = sqrt 5), ``up`` zero, so the update starts at zero.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, alpha: float | None = None,
                 multiplier: float = 1.0, dropout: float = 0.0, conv: ConvShape | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        kw = {"device": device, "dtype": dtype, "bias": False}
        self.rank = rank
        self.alpha = alpha  # None or 0: alpha = rank (kohya)
        self.multiplier = multiplier
        self.dropout = dropout
        self.conv = conv
        if conv is None:
            self.down: nn.Module = nn.Linear(in_features, rank, **kw)
            self.up: nn.Module = nn.Linear(rank, out_features, **kw)
        else:
            self.down = nn.Conv2d(in_features, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                  dilation=conv.dilation, **kw)
            self.up = nn.Conv2d(rank, out_features, 1, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    @property
    def in_features(self) -> int:
        return self.down.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.weight.shape[0]

    @property
    def effective_alpha(self) -> float:
        """``alpha``, or ``rank`` where it is absent or zero."""
        return float(self.alpha) if self.alpha else float(self.rank)

    @property
    def scale(self) -> float:
        """``multiplier * alpha / rank``."""
        return self.multiplier * self.effective_alpha / self.rank

    def forward(self, x: Tensor, *, training: bool | None = None) -> Tensor:
        """The update for input ``x`` (the base layer's input); dropout acts on ``x`` (PEFT's
        placement) when ``training`` (default: this module's mode)."""
        training = self.training if training is None else training
        if self.dropout and training:
            x = F.dropout(x, self.dropout, training=True)
        return self.up(self.down(x)) * self.scale

    def delta_weight(self) -> Tensor:
        """The update as a weight of the base layer's shape: ``scale * up @ down``
        (``(out, in)`` or ``(out, in, kh, kw)``)."""
        up = self.up.weight.flatten(1)  # (out, rank)
        down = self.down.weight  # (rank, in) or (rank, in, kh, kw)
        w = up @ down.flatten(1)  # (out, in * kh * kw)
        return w.view(up.shape[0], *down.shape[1:]) * self.scale

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, multiplier={self.multiplier}, dropout={self.dropout}, "
                f"conv={self.conv is not None}")
