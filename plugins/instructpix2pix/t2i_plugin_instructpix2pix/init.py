"""An InstructPix2Pix model initialised from a Stable Diffusion one (the reference
``ddpm_edit.py::init_from_ckpt``, diffusers ``train_instruct_pix2pix.py``): the UNet's input conv
grows from 4 to 8 channels, the 4 new ones (the source latent's) zero, the old weights and the bias
kept, so the grown model ignores the source image until trained."""

from __future__ import annotations

import torch

__all__ = ["grow_to_edit_model"]


def grow_to_edit_model(model: object) -> object:
    """A new SD bundle equal to ``model`` (an SD plugin bundle with a 4-channel UNet) but with an
    8-channel input conv whose new input channels are zero."""
    from t2i_plugin_sd.model import build_model

    from t2i_plugin_instructpix2pix.edit import EDIT_CHANNELS

    weights = model.weights()  # type: ignore[attr-defined]
    old = weights.unet["conv_in.weight"]
    if old.shape[1] * 2 != EDIT_CHANNELS:
        raise ValueError(f"grow_to_edit_model needs a UNet with 4 input channels; this one has {old.shape[1]}")
    grown = torch.zeros(old.shape[0], EDIT_CHANNELS, *old.shape[2:], dtype=old.dtype, device=old.device)
    grown[:, : old.shape[1]] = old
    weights.unet = {**weights.unet, "conv_in.weight": grown}
    weights.hints = dict(weights.hints)
    # the architecture is read back from the weights (in_channels from conv_in.weight), the rest as it was
    return build_model(weights, model.arch, explicit=True).to(old.device)  # type: ignore[attr-defined]
