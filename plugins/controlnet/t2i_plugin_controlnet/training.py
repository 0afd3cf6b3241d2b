"""Stable Diffusion with a ControlNet as a :class:`~t2i_engine.training.protocol.TrainableModel`.

The paper's recipe (Zhang et al. 2023, section 3.3 and the original ``cldm`` code): the loss is
SD's own noise-prediction loss with the ControlNet's residuals added to the UNet; the prompt is
replaced by ``""`` for a fraction of the samples (50 % in the paper) so the network learns to
read the hint alone; with ``sd_locked`` (the default) only the ControlNet trains, without it the
UNet's decoder half (``output_blocks`` and ``out`` in the original, our ``up_blocks``,
``conv_norm_out`` and ``conv_out``) trains as well. The text encoder and autoencoder are frozen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

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

    def __init__(self, model: StableDiffusion, chain: ConditionerChain, *, empty_prompt_ratio: float = 0.5,
                 sd_locked: bool = True, sample_hints: Sequence[str] = ()) -> None:
        super().__init__(model, caption_dropout=empty_prompt_ratio, train_text_encoder=False, conditioners=chain)
        self.sd_locked = sd_locked
        self.sample_hints = list(sample_hints)  # image files, one per prompt of the loop's sample grids
        model.unet.requires_grad_(False)
        for name, p in model.unet.named_parameters():
            p.requires_grad_(not sd_locked and name.startswith(DECODER_PREFIXES))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The ControlNet's parameters, then (``sd_locked`` off) the UNet decoder's."""
        assert self.conditioners is not None
        yield from self.conditioners.trainable_parameters()
        if not self.sd_locked:
            yield from (p for n, p in self.model.unet.named_parameters() if n.startswith(DECODER_PREFIXES))

    @torch.no_grad()
    def sample_images(self, prompts: list[str], *, generator: torch.Generator | None) -> Tensor:
        """The training loop's sample grids (``[train] sample_every``): prompt ``i`` drawn with the
        hint of ``sample_hints[i]`` (read at the training images' size) through the ControlNet, by
        the core's :func:`~t2i_engine.tasks.grid.sample_batched` (DDIM, ``sample_steps`` steps,
        guidance 7.5, seeds drawn from ``generator``). Each tile is the hint beside its image:
        ``(N, 3, H, 2W)`` in [-1, 1]."""
        from t2i_engine.conditioning.inputs import load_image
        from t2i_engine.diffusion.guidance import GuidanceConfig
        from t2i_engine.diffusion.registry import SAMPLERS, DDIMConfig
        from t2i_engine.tasks.grid import sample_batched
        from t2i_plugin_controlnet.conditioner import HINT_INPUT

        if len(prompts) != len(self.sample_hints):
            raise ValueError(f"{len(prompts)} sample prompts but {len(self.sample_hints)} sample hints")
        assert self.conditioners is not None
        f = self.model.vae.downsample_factor
        _, h, w = self.latent_shape or (self.model.vae.latent_channels, 8, 8)
        if h != w:
            raise ValueError(f"sample grids need square training images, got {h * f}x{w * f}")
        hints = torch.cat([load_image(url, width=w * f, height=h * f, key=f"task.sample_hints[{i}]")
                           for i, url in enumerate(self.sample_hints)])
        seeds = torch.randint(0, 2**31, (len(prompts),), generator=generator,
                              device=generator.device if generator is not None else None).tolist()
        was_training = self.training
        self.eval()
        self.conditioners.set_images(0, HINT_INPUT, hints)
        try:
            sampler = SAMPLERS["ddim"](DDIMConfig(steps=self.sample_steps))
            images = sample_batched(self.model, prompts, seeds, sampler=sampler, guidance=GuidanceConfig(), size=h * f,
                                    batch_size=len(prompts), progress=False, conditioners=self.conditioners)
        finally:
            self.conditioners.set_images(0, HINT_INPUT, None)  # training batches bring their own hints
            self.train(was_training)
        return torch.cat([hints.to(images), images], dim=-1)
