"""The engine's contracts: small typed interfaces every model plugin fills in.

Conventions used everywhere in the engine:

* Images are ``(B, C, H, W)`` float tensors in ``[-1, 1]``; latents are ``(B, C, h, w)``.
* Noise levels are *sigmas* in the variance-exploding form ``x = x0 + sigma * eps``
  (Karras et al. 2022). A discrete VP schedule maps to it by ``sigma = sqrt((1 - a) / a)`` with
  ``a = alpha_bar``; samplers never see timesteps, only sigmas.
* A *denoiser* in sampler space is ``model(x, sigma) -> x0``; :class:`DenoiserNet` is the raw
  network, and :mod:`t2i_engine.diffusion.parameterization` wraps it into that form so samplers
  and guidance never branch on the prediction type.
* Everything that conditions the network travels in one :class:`Conditioning` container.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from t2i_engine.config.schema import RunConfig
    from t2i_engine.plugins.manager import EnginePluginManager

Prediction = Literal["eps", "v", "x0", "edm"]
"""What a :class:`DenoiserNet` predicts: noise, velocity, the clean sample, or the EDM
preconditioned output ``F`` (Karras et al. 2022, eq. 7)."""

PREDICTIONS: tuple[str, ...] = ("eps", "v", "x0", "edm")


@dataclass
class TextEmbedding:
    """What a :class:`TextEncoder` returns for a batch of prompts."""

    tokens: Tensor  # (B, L, D) per-token hidden states fed to cross-attention
    mask: Tensor | None = None  # (B, L) bool, True where a token is real (not padding)
    pooled: Tensor | None = None  # (B, D') one vector per prompt, when the encoder has one

    def to(self, *args: Any, **kwargs: Any) -> TextEmbedding:
        """Move or cast every tensor (``torch.Tensor.to`` arguments)."""
        return TextEmbedding(
            self.tokens.to(*args, **kwargs),
            None if self.mask is None else self.mask.to(kwargs.get("device", self.mask.device)),
            None if self.pooled is None else self.pooled.to(*args, **kwargs),
        )


@dataclass
class Conditioning:
    """Everything that conditions a denoiser for one batch.

    ``text`` carries the prompt embedding; ``extras`` carries any further tensors keyed by
    name, batch-first (``"hint"`` for ControlNet, ``"concat"`` for channel-concatenated images
    in InstructPix2Pix, ``"class_labels"`` ...). Guidance wrappers build the unconditional batch
    with :meth:`cat` so one forward serves both branches.
    """

    text: TextEmbedding | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int | None:
        """The batch size of the first tensor present, or None for an empty conditioning."""
        if self.text is not None:
            return int(self.text.tokens.shape[0])
        for value in self.extras.values():
            return int(value.shape[0])
        return None

    def to(self, *args: Any, **kwargs: Any) -> Conditioning:
        """Move or cast every tensor (``torch.Tensor.to`` arguments)."""
        text = None if self.text is None else self.text.to(*args, **kwargs)
        extras = {k: v.to(*args, **kwargs) if v.is_floating_point() else v.to(kwargs.get("device", v.device))
                  for k, v in self.extras.items()}
        return Conditioning(text=text, extras=extras)

    def repeat(self, n: int) -> Conditioning:
        """Repeat every tensor ``n`` times along the batch (``repeat_interleave``)."""
        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(n, dim=0)

        text = None
        if self.text is not None:
            text = TextEmbedding(rep(self.text.tokens), rep(self.text.mask), rep(self.text.pooled))  # type: ignore[arg-type]
        return Conditioning(text=text, extras={k: rep(v) for k, v in self.extras.items()})  # type: ignore[misc]

    def with_extras(self, **extras: Tensor) -> Conditioning:
        """A copy with ``extras`` added or replaced."""
        return replace(self, extras={**self.extras, **extras})

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate conditionings along the batch; they must carry the same fields."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one conditioning")
        first = items[0]
        keys = set(first.extras)
        for c in items[1:]:
            if set(c.extras) != keys or (c.text is None) != (first.text is None):
                raise ValueError("Conditioning.cat: the conditionings carry different fields")
        text = None
        if first.text is not None:
            texts = [c.text for c in items]  # type: ignore[misc]
            tokens = [t.tokens for t in texts]  # type: ignore[union-attr]
            if len({t.shape[1] for t in tokens}) != 1:
                raise ValueError("Conditioning.cat: text embeddings have different lengths")
            mask = None if first.text.mask is None else torch.cat([t.mask for t in texts])  # type: ignore[union-attr,misc]
            pooled = None if first.text.pooled is None else torch.cat([t.pooled for t in texts])  # type: ignore[union-attr,misc]
            text = TextEmbedding(torch.cat(tokens), mask, pooled)
        extras = {k: torch.cat([c.extras[k] for c in items]) for k in first.extras}
        return Conditioning(text=text, extras=extras)


@runtime_checkable
class TextEncoder(Protocol):
    """Turns prompts into a :class:`TextEmbedding`.

    ``max_length`` is the token length every embedding is padded or truncated to, ``dim`` the
    hidden size of ``tokens``. Encoding ``""`` must give the unconditional embedding that
    classifier-free guidance and caption dropout use.
    """

    max_length: int
    dim: int

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """Encode a batch of prompts (a list of str; anything else is a TypeError)."""
        ...


@runtime_checkable
class Autoencoder(Protocol):
    """Maps images to latents and back; pixel-space models use the identity.

    ``scaling_factor`` (and ``shift_factor``) belong to the autoencoder: :meth:`encode` returns
    latents already scaled for the denoiser and :meth:`decode` undoes it.
    """

    latent_channels: int
    downsample_factor: int  # spatial factor between image and latent (8 for SD's KL-f8)
    scaling_factor: float

    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] ``(B, 3, H, W)`` -> scaled latents ``(B, C, H/f, W/f)``.

        With a ``generator`` the posterior is sampled; without one its mean is returned.
        """
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in about [-1, 1]."""
        ...


class DenoiserNet(nn.Module):
    """Base class of the networks that denoise: ``forward(x_t, t, cond) -> output``.

    ``t`` is the network's own time input (the discrete timestep for DDPM-trained UNets, EDM's
    ``c_noise`` for EDM models), ``prediction`` says what the output is. Subclasses set
    ``prediction`` and implement :meth:`forward`; they never scale inputs themselves.
    """

    prediction: Prediction = "eps"

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:  # pragma: no cover
        raise NotImplementedError


@runtime_checkable
class NoiseSchedule(Protocol):
    """A noise schedule seen through sigmas (see the module docstring for the convention).

    ``discrete`` schedules are defined on ``num_train_timesteps`` integer timesteps and map
    sigmas back to (fractional) timesteps for the network; continuous ones map sigma to the
    network's time input directly.
    """

    discrete: bool
    sigma_min: float
    sigma_max: float

    def sampling_sigmas(self, steps: int, *, device: torch.device | None = None) -> Tensor:
        """Decreasing sigmas for ``steps`` sampler steps, with a final 0 appended (steps+1)."""
        ...

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The network's time input for each sigma."""
        ...

    def sample_training_sigmas(self, batch: int, *, generator: torch.Generator | None = None,
                               device: torch.device | None = None) -> Tensor:
        """Noise levels for a training batch ``(B,)``, drawn as the schedule trains."""
        ...


Denoiser = Callable[[Tensor, Tensor], Tensor]
"""Sampler-space model: ``model(x, sigma) -> x0`` with sigma of shape ``(B,)`` or scalar."""

StepCallback = Callable[[dict[str, Any]], None]
"""Called after each sampler step with ``{"i", "x", "sigma", "sigma_next", "denoised"}``."""


@runtime_checkable
class Sampler(Protocol):
    """A sampler bound to its options: a pure function over a sigma sequence.

    It holds no per-run state: the same call with the same generator gives the same result.
    """

    def __call__(self, model: Denoiser, x: Tensor, sigmas: Tensor, *,
                 generator: torch.Generator | None = None,
                 callback: StepCallback | None = None) -> Tensor:
        """Integrate from ``x`` (noise at ``sigmas[0]``) down the sigma sequence to a sample."""
        ...


@runtime_checkable
class Conditioner(Protocol):
    """Turns one input (a prompt, a hint image, a source image ...) into conditioning.

    :meth:`condition` adds its tensors to a :class:`Conditioning`; :meth:`wrap` may wrap the
    raw network (ControlNet residuals, InstructPix2Pix concat). The default is the identity.
    """

    name: str

    def condition(self, cond: Conditioning, inputs: Mapping[str, Any]) -> Conditioning:
        """Return ``cond`` with this conditioner's contribution for ``inputs`` added."""
        ...

    def wrap(self, net: DenoiserNet) -> DenoiserNet:
        """Wrap the network; return it unchanged when there is nothing to wrap."""
        ...


@runtime_checkable
class LatentDiffusionModel(Protocol):
    """A text-to-image model bundle the core's ``sample``, ``train`` and ``precache`` tasks drive.

    What a ``[model]`` factory returns (Stable Diffusion's ``StableDiffusion`` is one). Pixel-space
    models fit too, with an identity ``autoencoder``. Optional: a ``description`` str written into
    sample PNGs (default: the ``[model] type``).
    """

    text_encoder: TextEncoder
    autoencoder: Autoencoder
    denoiser: DenoiserNet  # its ``prediction`` says eps / v / x0 / edm
    schedule: NoiseSchedule

    def to(self, device: torch.device) -> LatentDiffusionModel:
        """Move every network to ``device`` (returns the model)."""
        ...

    def trainable(self, *, caption_dropout: float, train_text_encoder: bool) -> nn.Module:
        """The model wrapped for the training loop (a ``t2i_engine.training.protocol.TrainableModel``
        whose trainable weights are this model's own parameters, so training updates ``self``).

        Captions are replaced by ``""`` with probability ``caption_dropout``; batches may carry
        precached ``latents`` and ``text_tokens`` instead of ``image`` and ``caption``.
        """
        ...

    def save(self, url: str, *, format: str | None = None) -> None:
        """Export the weights to ``url`` in ``format`` (the model's default when None)."""
        ...


@dataclass
class RunContext:
    """What a task receives: the resolved configuration and the engine around it."""

    config: RunConfig
    plugins: EnginePluginManager
    output_dir: Path
    device: torch.device
    seed: int
    debug: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """A job that ``t2i-engine run`` can execute (sample, train, precache, evaluate, ...)."""

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        """Do the job; return a small summary (paths written, metrics) that the CLI prints."""
        ...


__all__ = [
    "PREDICTIONS",
    "Autoencoder",
    "Conditioner",
    "Conditioning",
    "Denoiser",
    "DenoiserNet",
    "LatentDiffusionModel",
    "NoiseSchedule",
    "Prediction",
    "RunContext",
    "Sampler",
    "StepCallback",
    "Task",
    "TextEmbedding",
    "TextEncoder",
]
