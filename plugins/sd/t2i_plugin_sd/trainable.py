"""Stable Diffusion as a :class:`~t2i_engine.training.protocol.TrainableModel`: UNet fine-tuning
with a frozen autoencoder and (optionally frozen) text encoder."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from t2i_engine.conditioning.chain import ConditionerChain
from t2i_engine.diffusion.parameterization import training_batch
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import Conditioning, TextEmbedding
from t2i_plugin_sd.model import StableDiffusion


class SDTrainable(nn.Module):
    """Wraps a model for the Fabric loop.

    A batch holds ``"image"`` ``(B, 3, H, W)`` in [-1, 1] and ``"caption"`` (list of str), or
    precached ``"latents"`` (already scaled) and ``"text_tokens"`` ``(B, L, D)``. Captions are
    replaced by ``""`` with probability ``caption_dropout`` - the same empty prompt inference
    uses as its unconditional input - so classifier-free guidance works after training.

    ``conditioners`` (the run's ``[[conditioners]]``, a
    :class:`~t2i_engine.conditioning.ConditionerChain`) condition every batch (its extra fields,
    e.g. ``hint``, reach their ``condition()``), the UNet is called through the chain, and their
    trainable parameters train with the UNet.
    """

    def __init__(self, model: StableDiffusion, *, caption_dropout: float = 0.1, train_text_encoder: bool = False,
                 sample_posterior: bool = True, conditioners: ConditionerChain | None = None) -> None:
        super().__init__()
        self.model = model
        self.conditioners = conditioners  # a submodule: moved, checkpointed and trained with the model
        self.caption_dropout = caption_dropout
        self.train_text_encoder = train_text_encoder
        self.sample_posterior = sample_posterior
        self.sample_steps = 20  # DDIM steps of sample_images
        self.latent_shape: tuple[int, ...] | None = None  # (C, h, w) of the last batch, for sample_images
        model.vae.requires_grad_(False)
        model.text_encoder.requires_grad_(train_text_encoder)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """UNet parameters, the text encoder's when it is trained, and the conditioners' trainable ones."""
        yield from self.model.unet.parameters()
        if self.train_text_encoder:
            yield from self.model.text_encoder.parameters()
        if self.conditioners is not None:
            yield from self.conditioners.trainable_parameters()

    def keep_mask(self, n: int, *, generator: torch.Generator | None) -> Tensor:
        """``(n,)`` bool, False where a caption is dropped (probability ``caption_dropout``)."""
        device = generator.device if generator is not None else None  # draw where the generator lives
        return (torch.rand(n, generator=generator, device=device) >= self.caption_dropout).cpu()

    def drop_captions(self, captions: list[str], *, generator: torch.Generator | None) -> list[str]:
        """Replace each caption by ``""`` with probability ``caption_dropout``."""
        keep = self.keep_mask(len(captions), generator=generator)
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def _latents(self, batch: Mapping[str, Any], generator: torch.Generator | None) -> Tensor:
        if "latents" in batch:
            return batch["latents"]
        with torch.no_grad():
            gen = generator if self.sample_posterior else None
            if gen is not None and gen.device != batch["image"].device:
                gen = None
            return self.model.vae.encode(batch["image"], generator=gen)

    def _text(self, batch: Mapping[str, Any], generator: torch.Generator | None) -> TextEmbedding:
        if "text_tokens" in batch:
            return self._precached_text(batch, generator)
        captions = self.drop_captions(list(batch["caption"]), generator=generator)
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return self.model.text_encoder.encode(captions)

    def _precached_text(self, batch: Mapping[str, Any], generator: torch.Generator | None) -> TextEmbedding:
        """Precached embeddings; dropped rows get the embedding of ``""`` (the same draws as
        :meth:`drop_captions`, so a run on precached data matches one on images)."""
        if self.train_text_encoder:
            raise ConfigError("task.train_text_encoder: precached text embeddings are fixed; train the "
                              "text encoder on images and captions instead")
        emb = TextEmbedding(batch["text_tokens"], batch.get("text_mask"), batch.get("text_pooled"))
        keep = self.keep_mask(emb.tokens.shape[0], generator=generator).to(emb.tokens.device)
        if bool(keep.all()):
            return emb
        with torch.no_grad():
            empty = self.model.text_encoder.encode([""]).to(device=emb.tokens.device)

        def mix(t: Tensor | None, u: Tensor | None) -> Tensor | None:
            if t is None or u is None:
                return t
            return torch.where(keep.view(-1, *([1] * (t.ndim - 1))), t, u.to(t.dtype).expand_as(t))

        return TextEmbedding(mix(emb.tokens, empty.tokens), mix(emb.mask, empty.mask),  # type: ignore[arg-type]
                             mix(emb.pooled, empty.pooled))

    def training_loss(self, batch: Mapping[str, Any], *, generator: torch.Generator | None) -> Tensor:
        """MSE between the UNet output and its target (eps or v) at a random noise level."""
        return self(batch, generator=generator)

    @torch.no_grad()
    def sample_images(self, prompts: list[str], *, generator: torch.Generator | None) -> Tensor:
        """Images ``(N, 3, H, W)`` in [-1, 1] for the training loop's TensorBoard grids: DDIM,
        ``sample_steps`` steps, guidance 7.5, at the latent size of the last training batch."""
        from t2i_engine.diffusion.guidance import GuidanceConfig
        from t2i_engine.diffusion.registry import SAMPLERS, DDIMConfig
        from t2i_engine.pipeline import generate

        shape = self.latent_shape or (self.model.vae.latent_channels, 8, 8)
        device = next(self.model.unet.parameters()).device
        noise = torch.randn(len(prompts), *shape, generator=generator,
                            device=generator.device if generator is not None else device)
        was_training = self.training
        self.eval()
        try:
            return generate(self.model, prompts, noise, sampler=SAMPLERS["ddim"](DDIMConfig(steps=self.sample_steps)),
                            guidance=GuidanceConfig(), generator=generator)
        finally:
            self.train(was_training)

    def forward(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> Tensor:
        x0 = self._latents(batch, generator)
        self.latent_shape = tuple(x0.shape[1:])
        cond = Conditioning(text=self._text(batch, generator))
        net: Any = self.model.unet
        if self.conditioners is not None:
            f = self.model.vae.downsample_factor
            cond = self.conditioners.condition_batch(cond, batch, prompts=list(batch.get("caption", [""] * len(x0))),
                                                     height=x0.shape[-2] * f, width=x0.shape[-1] * f)
            net = self.conditioners.compose(self.model.unet)
        tb = training_batch(x0, self.model.schedule, prediction=self.model.prediction, generator=generator)
        out = net(tb.net_input, tb.t, cond)
        return tb.loss(out)
