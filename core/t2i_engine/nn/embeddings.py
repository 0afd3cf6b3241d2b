"""Timestep embeddings: the sinusoidal features and the MLP that widens them.

The sinusoid follows "Attention Is All You Need" (Vaswani et al. 2017) as used by DDPM
(Ho et al. 2020); ``flip_sin_to_cos`` and ``freq_shift`` reproduce the layouts that existing
checkpoints were trained with (Stable Diffusion: cos first, shift 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.nn import ops


def timestep_embedding(t: Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps ``(B,)`` -> ``(B, dim)`` float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Two linear layers with a SiLU between: sinusoid ``(B, in_dim)`` -> ``(B, dim)``."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = ops.Linear(in_dim, dim)
        self.linear_2 = ops.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
