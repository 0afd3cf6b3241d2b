"""InstructPix2Pix's conditioning dropout (Brooks et al. 2023, section 3.2.1; the reference
``ddpm_edit.py::get_input`` with ``uncond = 0.05``; diffusers ``--conditioning_dropout_prob``).

One uniform draw ``r`` per training example decides both drops, so the three cases are disjoint
and the model learns the three guidance branches' inputs:

* ``r < p``: the text only is dropped (replaced by the embedding of ``""``);
* ``p <= r < 2p``: both text and source image are dropped;
* ``2p <= r < 3p``: the source image only is dropped (its latent zeroed);

i.e. text dropped when ``r < 2p``, image dropped when ``p <= r < 3p``: with ``p = 0.05``, 5% text
only, 5% both, 5% image only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["conditioning_dropout"]


def conditioning_dropout(n: int, probability: float, *,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(drop_text, drop_image)``: two ``(n,)`` bool tensors on the CPU from one draw
    ``r ~ U(0, 1)`` per example (on the generator's device): ``drop_text = r < 2p`` and
    ``drop_image = p <= r < 3p``."""
    if not 0.0 <= probability <= 1.0 / 3.0:
        raise ValueError(f"conditioning dropout probability must be in [0, 1/3], got {probability}")
    device = generator.device if generator is not None else None
    r = torch.rand(n, generator=generator, device=device).cpu()
    return r < 2 * probability, (r >= probability) & (r < 3 * probability)
