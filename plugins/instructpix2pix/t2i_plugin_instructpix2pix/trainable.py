"""InstructPix2Pix as a :class:`~t2i_engine.training.protocol.TrainableModel`: the 8-channel UNet
learns to denoise the *edited* image given the instruction and the *source* image's latent.

It is the SD plugin's :class:`~t2i_plugin_sd.trainable.SDTrainable` (frozen autoencoder, optional
text-encoder training, the core noise/target maths) with the reference's inputs:

* target latents: the posterior of the edited image, sampled and scaled (as SD trains);
* source latents: the posterior MODE of the source image, unscaled, concatenated after the noisy
  latent (``cond.extras["concat"]``, what :func:`~t2i_plugin_instructpix2pix.edit.edit_images` feeds);
* conditioning dropout: :func:`~t2i_plugin_instructpix2pix.dropout.conditioning_dropout`
  (5% text only, 5% both, 5% image only for ``p = 0.05``), in place of SD's caption dropout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from t2i_engine.diffusion.parameterization import training_batch
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import Conditioning, TextEmbedding
from t2i_plugin_instructpix2pix.dropout import conditioning_dropout
from t2i_plugin_instructpix2pix.edit import check_edit_model, source_latents
from t2i_plugin_sd.model import StableDiffusion
from t2i_plugin_sd.trainable import SDTrainable

__all__ = ["EditTrainable"]


class EditTrainable(SDTrainable):
    """Wraps an 8-channel SD bundle for the Fabric loop.

    A batch holds the edited image as ``"image"`` ``(B, 3, H, W)`` in [-1, 1] (or precached scaled
    ``"latents"``), the source image as ``"source"`` (or precached unscaled ``"source_latents"``)
    and the instruction as ``"caption"`` (list of str).
    """

    def __init__(self, model: StableDiffusion, *, conditioning_dropout: float = 0.05,
                 train_text_encoder: bool = False, sample_posterior: bool = True) -> None:
        check_edit_model(model)
        super().__init__(model, caption_dropout=0.0, train_text_encoder=train_text_encoder,
                         sample_posterior=sample_posterior)
        self.conditioning_dropout = conditioning_dropout

    def sample_images(self, prompts: list[str], *, generator: torch.Generator | None) -> Tensor:
        """Not available: an edit needs source images, which ``[train] sample_prompts`` cannot give."""
        raise ConfigError("train.sample_every: InstructPix2Pix training cannot draw sample grids from prompts "
                          "alone (an edit needs a source image); set sample_every = 0")

    def _source(self, batch: Mapping[str, Any]) -> Tensor:
        if "source_latents" in batch:
            return batch["source_latents"]
        with torch.no_grad():
            return source_latents(self.model.vae, batch["source"])

    def _instructions(self, batch: Mapping[str, Any], drop: Tensor) -> TextEmbedding:
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return self.model.text_encoder.encode(captions)

    def forward(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> Tensor:
        x0 = self._latents(batch, generator)  # (B, 4, h, w) scaled target latents
        self.latent_shape = tuple(x0.shape[1:])
        source = self._source(batch).to(x0.dtype)  # (B, 4, h, w) unscaled mode
        if source.shape != x0.shape:
            raise ValueError(f"source latents {tuple(source.shape)} do not match the edited image's "
                             f"{tuple(x0.shape)}: source and target must have the same size")
        drop_text, drop_image = conditioning_dropout(x0.shape[0], self.conditioning_dropout, generator=generator)
        keep_image = (~drop_image).to(source.device, source.dtype).view(-1, 1, 1, 1)
        cond = Conditioning(text=self._instructions(batch, drop_text), extras={"concat": source * keep_image})
        tb = training_batch(x0, self.model.schedule, prediction=self.model.prediction, generator=generator)
        return tb.loss(self.model.unet(tb.net_input, tb.t, cond))
