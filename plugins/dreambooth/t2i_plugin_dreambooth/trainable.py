"""DreamBooth's loss around any model's own training loss, and the LoRA or full-weight choice.

The model plugin's ``trainable()`` wrapper (the bundle contract) knows how to turn images and
captions into its diffusion loss; DreamBooth only adds the prior-preservation term (Ruiz et al.
2022, eq. 2)::

    loss = L(instance images, instance captions) + prior_loss_weight * L(class images, class captions)

each ``L`` the plugin's mean loss over its half of the batch, which is what diffusers'
``train_dreambooth.py`` computes after ``chunk(2)`` of one concatenated batch (NeMo's DreamBooth
used weight 0.5, diffusers and kohya 1.0). With LoRA, the model is frozen and only the adapter
(created by :func:`t2i_engine.adapters.create_adapter` on the model's own module names) trains.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from t2i_engine.adapters import Adapter
from t2i_engine.nn.checkpointing import enable_gradient_checkpointing

__all__ = ["DreamBoothTrainable"]


class DreamBoothTrainable(nn.Module):
    """A :class:`~t2i_engine.training.protocol.TrainableModel` for the core Fabric loop.

    Args:
        inner: the model's own trainable wrapper (``model.trainable(...)``): its
            ``training_loss(batch, generator=)`` takes ``{"image", "caption"}`` batches.
        prior_loss_weight: weight of the class-image term; the term is computed only when
            batches carry ``class_image`` (prior preservation on).
        adapter: the LoRA being trained (attached to the model inside ``inner``), or None to
            train what ``inner.trainable_parameters()`` yields (full fine-tune).
    """

    def __init__(self, inner: nn.Module, *, prior_loss_weight: float = 1.0, adapter: Adapter | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter  # a submodule: on the device, in checkpoints and in the EMA with the model
        self.prior_loss_weight = float(prior_loss_weight)
        if adapter is not None:
            inner.requires_grad_(False)
            adapter.requires_grad_(True)
            self._params = list(adapter.parameters())
        else:
            self._params = list(inner.trainable_parameters())  # type: ignore[operator]
        if not callable(getattr(inner, "sample_images", None)):
            self.sample_images = None  # the loop then skips its sample grids, as for the model alone

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The adapter's parameters (LoRA), or the model's trainable ones (full fine-tune)."""
        return iter(self._params)

    def losses(self, batch: Mapping[str, Any], *, generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
        """``(instance loss, prior loss or None)`` of one batch."""
        loss = self.inner.training_loss({"image": batch["image"], "caption": batch["caption"]},  # type: ignore[operator]
                                        generator=generator)
        if "class_image" not in batch:
            return loss, None
        prior = self.inner.training_loss({"image": batch["class_image"], "caption": batch["class_caption"]},  # type: ignore[operator]
                                         generator=generator)
        return loss, prior

    def training_loss(self, batch: Mapping[str, Any], *, generator: torch.Generator | None) -> Tensor:
        """Instance loss plus ``prior_loss_weight`` times the class-image loss."""
        return self(batch, generator=generator)

    def forward(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> Tensor:
        loss, prior = self.losses(batch, generator=generator)
        return loss if prior is None else loss + self.prior_loss_weight * prior

    @torch.no_grad()
    def sample_images(self, prompts: list[str], *, generator: torch.Generator | None) -> Tensor:
        """The model's own TensorBoard samples (with the adapter applied), when it has them."""
        return self.inner.sample_images(prompts, generator=generator)  # type: ignore[operator]

    def enable_gradient_checkpointing(self) -> None:
        """The model's own switch when it has one, else the shared blocks it is built of."""
        fn = getattr(self.inner, "enable_gradient_checkpointing", None)
        if fn is not None:
            fn()
        elif enable_gradient_checkpointing(self.inner) == 0:
            from t2i_engine.errors import ConfigError

            raise ConfigError(f"train.gradient_checkpointing: {type(self.inner).__name__} supports none")
