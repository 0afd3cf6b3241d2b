"""Stable Diffusion with a ControlNet as a :class:`~t2i_engine.training.protocol.TrainableModel`.

The paper's recipe (Zhang et al. 2023, section 3.3 and the original ``cldm`` code): the loss is
SD's own noise-prediction loss with the ControlNet's residuals added to the UNet; the prompt is
replaced by ``""`` for a fraction of the samples (50 % in the paper) so the network learns to
read the hint alone; with ``sd_locked`` (the default) only the ControlNet trains, without it the
UNet's decoder half (``output_blocks`` and ``out`` in the original, our ``up_blocks``,
``conv_norm_out`` and ``conv_out``) trains as well. The text encoder and autoencoder are frozen.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from t2i_engine.conditioning.chain import ConditionerChain
from t2i_plugin_sd.model import StableDiffusion
from t2i_plugin_sd.trainable import SDTrainable

__all__ = ["DECODER_PREFIXES", "ControlNetTrainable"]

DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")
"""The UNet parameters ``sd_locked = false`` trains (the original's output_blocks and out)."""


class ControlNetTrainable(SDTrainable):
    """The SD model with its ControlNet chain around the UNet; what trains is the ControlNet's
    parameters (and the UNet's decoder when ``sd_locked`` is off).

    The batch holds what :class:`~t2i_plugin_sd.trainable.SDTrainable` reads (``image`` or
    ``latents``, ``caption``) and the hint under the conditioner's ``batch_key``.
    """

    sample_images = None  # the loop's sample grids would need hints: not drawn

    def __init__(self, model: StableDiffusion, chain: ConditionerChain, *, empty_prompt_ratio: float = 0.5,
                 sd_locked: bool = True) -> None:
        super().__init__(model, caption_dropout=empty_prompt_ratio, train_text_encoder=False, conditioners=chain)
        self.sd_locked = sd_locked
        model.unet.requires_grad_(False)
        for name, p in model.unet.named_parameters():
            p.requires_grad_(not sd_locked and name.startswith(DECODER_PREFIXES))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The ControlNet's parameters, then (``sd_locked`` off) the UNet decoder's."""
        assert self.conditioners is not None
        yield from self.conditioners.trainable_parameters()
        if not self.sd_locked:
            yield from (p for n, p in self.model.unet.named_parameters() if n.startswith(DECODER_PREFIXES))
