"""What the training loop needs from a model: the :class:`TrainableModel` protocol.

Only :meth:`TrainableModel.training_loss` and :meth:`TrainableModel.trainable_parameters` are
required. The optional methods are looked up with ``getattr``; the loop calls them when the
config asks for the feature (``sample_every``, ``gradient_checkpointing``, ``channels_last``,
``compile``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["TrainableModel", "check_trainable"]


@runtime_checkable
class TrainableModel(Protocol):
    """An ``nn.Module`` the Fabric loop can train.

    Required:

    * ``training_loss(batch, *, generator) -> Tensor``: a scalar loss for one micro-batch (a dict
      collated from the dataset's samples, already on the device). All randomness (noise levels,
      noise, caption dropout) must come from ``generator`` so that runs resume exactly. The loop
      routes this call through Fabric (DDP/FSDP forward, autocast), so the model must do its
      forward work inside it.
    * ``trainable_parameters() -> Iterator[nn.Parameter]``: what the optimizer and the EMA see;
      frozen parts (a text encoder, an autoencoder) are left out.

    Optional:

    * ``sample_images(prompts, *, generator) -> Tensor``: images ``(N, 3, H, W)`` in [-1, 1]
      for the TensorBoard grids; called with the EMA weights swapped in.
    * ``enable_gradient_checkpointing() -> None`` (default:
      :func:`t2i_engine.nn.checkpointing.enable_gradient_checkpointing` on the module, which
      flags the shared UNet blocks and the SD text tower it contains)
    * ``to_channels_last() -> None`` (default: ``module.to(memory_format=torch.channels_last)``)
    * ``compile_for_training() -> None`` (default: ``module.compile()``, i.e. its forward)
    """

    def training_loss(self, batch: Mapping[str, Any], *,
                      generator: torch.Generator | None) -> Tensor:
        """Scalar training loss of one micro-batch."""
        ...

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the optimizer updates (and the EMA tracks)."""
        ...


def check_trainable(model: Any) -> None:
    """Raise a ``TypeError`` naming what is missing when ``model`` cannot be trained."""
    missing = [m for m in ("training_loss", "trainable_parameters") if not callable(getattr(model, m, None))]
    if not isinstance(model, nn.Module):
        raise TypeError(f"the training loop needs an nn.Module, got {type(model).__name__}")
    if missing:
        raise TypeError(f"{type(model).__name__} does not implement TrainableModel: "
                        f"missing {', '.join(missing)}")


def sample_method(model: Any) -> Any:
    """The model's ``sample_images`` bound method, or None when it cannot sample."""
    fn = getattr(model, "sample_images", None)
    return fn if callable(fn) else None


def prompts_list(prompts: Sequence[str]) -> list[str]:
    """A plain list copy of ``prompts`` (models may require ``list``)."""
    return [str(p) for p in prompts]
