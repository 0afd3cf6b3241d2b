"""img2img: start sampling part-way down the sigma sequence from a noised image."""

from __future__ import annotations

import torch
from torch import Tensor

from t2i_engine.errors import ConfigError


def img2img_start(x0: Tensor, sigmas: Tensor, *, strength: float,
                  generator: torch.Generator | None = None,
                  noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Truncate ``sigmas`` for ``strength`` in (0, 1] and noise ``x0`` to its first level.

    As diffusers' img2img pipelines: of ``N = len(sigmas) - 1`` steps the last
    ``max(1, int(N * strength))`` are run. Returns ``(sigmas_tail, x_start)`` with
    ``x_start = x0 + sigmas_tail[0] * noise``; ``noise`` is drawn from ``generator`` unless given.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ConfigError(f"img2img strength must be a number in (0, 1], got {strength!r}")
    n = len(sigmas) - 1
    run = max(1, min(int(n * strength), n))
    tail = sigmas[n - run:]
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return tail, x0 + noise * tail[0].to(x0.dtype)
