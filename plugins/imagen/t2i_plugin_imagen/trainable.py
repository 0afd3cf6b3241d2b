"""An Imagen stage as a :class:`~t2i_engine.training.protocol.TrainableModel`: each stage of a
cascade trains on its own (Imagen trains its UNets independently).

One step (NeMo's ``EDMPrecond.compute_loss`` / ``ContinousDDPMPrecond.compute_loss``):

* captions replaced by ``""`` with probability ``caption_dropout``; with the stage's
  ``zero_empty`` T5 that is the all-zero null text guidance uses (Imagen: 10 %);
* super-resolution: the batch's images resized to ``lowres_size`` are the low-resolution input,
  noised to a random augmentation level (:class:`~t2i_plugin_imagen.stage.NoiseAugConfig`);
* a noise level from the preconditioning's training distribution, the core's
  :func:`~t2i_engine.diffusion.parameterization.training_batch` (EDM: ``ln sigma ~ N(P_mean,
  P_std^2)``, weight ``(sigma^2 + sd^2) / (sigma sd)^2`` on the x0 error; continuous DDPM: ``t ~
  U(0, 1)``, plain MSE on eps or x0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from t2i_engine.diffusion.parameterization import training_batch
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import Conditioning
from t2i_plugin_imagen.stage import ImagenStage, downsample


class ImagenTrainable(nn.Module):
    """Wraps an :class:`ImagenStage` for the Fabric loop; a batch holds ``"image"`` ``(B, 3, S, S)``
    in [-1, 1] with ``S`` the stage's ``image_size`` and ``"caption"`` (list of str)."""

    def __init__(self, stage: ImagenStage, *, caption_dropout: float = 0.1, train_text_encoder: bool = False) -> None:
        super().__init__()
        self.stage = stage
        self.caption_dropout = caption_dropout
        self.train_text_encoder = train_text_encoder
        stage.text_encoder.requires_grad_(train_text_encoder)
        self.sample_steps = 20  # EDM Heun steps of sample_images (base stages)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The UNet's parameters, and the T5's when ``train_text_encoder``."""
        yield from self.stage.unet.parameters()
        if self.train_text_encoder:
            yield from self.stage.text_encoder.model.parameters()

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
        device = generator.device if generator is not None else like.device
        return torch.randn(shape, generator=generator, device=device).to(like)

    def captions(self, captions: list[str], *, generator: torch.Generator | None) -> list[str]:
        """``captions`` with each replaced by ``""`` with probability ``caption_dropout``."""
        device = generator.device if generator is not None else None
        keep = (torch.rand(len(captions), generator=generator, device=device) >= self.caption_dropout).tolist()
        return [c if k else "" for c, k in zip(captions, keep)]

    def conditioning(self, batch: Mapping[str, Any], x0: Tensor, *, generator: torch.Generator | None) -> Conditioning:
        """Text (after dropout) and, for super-resolution, the augmented low-resolution input."""
        stage = self.stage
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            text = stage.text_encoder.encode(self.captions(list(batch["caption"]), generator=generator))
        cond = Conditioning(text=text.to(device=x0.device))
        if stage.lowres_size is None:
            return cond
        low = downsample(x0, stage.lowres_size)
        sigma = stage.noise_aug.training_sigmas(x0.shape[0], stage.schedule, generator=generator).to(x0.device)
        noise = self._draw(tuple(x0.shape), generator, x0)
        return cond.with_extras(**stage.lowres_conditioning(low, aug_sigma=sigma, noise=noise))

    def training_loss(self, batch: Mapping[str, Any], *, generator: torch.Generator | None) -> Tensor:
        """The preconditioned denoising loss of one batch (see the module docstring)."""
        return self(batch, generator=generator)

    def forward(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> Tensor:
        if "image" not in batch:
            raise ConfigError("an Imagen stage trains on images and captions (precached latents are not supported)")
        x0 = batch["image"]
        if tuple(x0.shape[-2:]) != (self.stage.image_size,) * 2:
            raise ConfigError(f"data: the images are {tuple(x0.shape[-2:])} but this Imagen stage generates "
                              f"{self.stage.image_size} px (set [data] size = {self.stage.image_size})")
        cond = self.conditioning(batch, x0, generator=generator)
        p = self.stage.precond
        tb = training_batch(x0, self.stage.schedule, prediction=p.prediction, generator=generator, weighting=p.weighting)
        return tb.loss(self.stage.unet(tb.net_input, tb.t, cond))

    @torch.no_grad()
    def sample_images(self, prompts: list[str], *, generator: torch.Generator | None) -> Tensor:
        """Images for the loop's TensorBoard grids: a base stage, EDM Heun, guidance 4 (a
        super-resolution stage has no low-resolution input here, so it returns none)."""
        from t2i_plugin_imagen.cascade import sample_stage

        from t2i_engine.diffusion.guidance import GuidanceConfig
        from t2i_engine.diffusion.registry import SAMPLERS, ChurnConfig

        stage = self.stage
        if stage.lowres_size is not None:
            return torch.zeros(0, 3, stage.image_size, stage.image_size)
        device = next(stage.unet.parameters()).device
        noise = torch.randn(len(prompts), 3, stage.image_size, stage.image_size, generator=generator,
                            device=generator.device if generator is not None else device)
        was_training = self.training
        self.eval()
        try:
            return sample_stage(stage, prompts, noise.to(device), sampler=SAMPLERS["heun"](ChurnConfig(steps=self.sample_steps)),
                                guidance=GuidanceConfig(guidance_scale=4.0), generator=generator)
        finally:
            self.train(was_training)
