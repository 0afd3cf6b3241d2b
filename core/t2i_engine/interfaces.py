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
import typing
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
    with :meth:`cat` so one forward serves both branches; ``branch`` marks which rows are the
    conditional ones (generation sets it; conditioners restricted to one guidance branch read it).
    """

    text: TextEmbedding | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    branch: Tensor | None = None  # (B,) bool, True on guidance's conditional rows (None: all conditional)

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
        branch = None if self.branch is None else self.branch.to(kwargs.get("device", self.branch.device))
        return Conditioning(text=text, extras=extras, branch=branch)

    def repeat(self, n: int) -> Conditioning:
        """Repeat every tensor ``n`` times along the batch (``repeat_interleave``)."""
        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(n, dim=0)

        text = None
        if self.text is not None:
            text = TextEmbedding(rep(self.text.tokens), rep(self.text.mask), rep(self.text.pooled))  # type: ignore[arg-type]
        return Conditioning(text=text, extras={k: rep(v) for k, v in self.extras.items()},  # type: ignore[misc]
                            branch=rep(self.branch))

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
        branches = [c.branch for c in items]
        branch = None if any(b is None for b in branches) else torch.cat(branches)  # type: ignore[arg-type]
        return Conditioning(text=text, extras=extras, branch=branch)

    def rows(self, index: Tensor) -> Conditioning:
        """The conditioning of the batch rows ``index`` (a ``(k,)`` long tensor)."""
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index.to(t.device)]

        text = None
        if self.text is not None:
            text = TextEmbedding(pick(self.text.tokens), pick(self.text.mask), pick(self.text.pooled))  # type: ignore[arg-type]
        return Conditioning(text=text, extras={k: pick(v) for k, v in self.extras.items()},  # type: ignore[misc]
                            branch=pick(self.branch))


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


Branch = Literal["cond", "uncond", "both"]
"""Which classifier-free-guidance branch a conditioner applies to (``[[conditioners]] branch``)."""


@dataclass
class ConditionInputs:
    """What :meth:`Conditioner.condition` receives for one generation (or one training batch).

    ``images`` holds the entry's ``inputs`` from the job (``[[conditioners]] inputs = { hint =
    "hint.png" }``), each loaded (path or fsspec URL) as ``(B, 3, height, width)`` in [-1, 1] on
    ``device`` in ``dtype`` (a ``.safetensors`` file gives its one tensor as stored, a first
    dimension of 1 expanded to B); in training, the batch's own fields (``batch["hint"]`` ...)
    are in ``batch`` as well.
    """

    branch: Literal["cond", "uncond"]  # which conditioning this call builds
    prompts: list[str]  # the prompts of this branch (negative prompts on "uncond")
    height: int  # image height in pixels
    width: int  # image width in pixels
    device: torch.device
    dtype: torch.dtype  # the dtype of the latents the net sees
    images: dict[str, Tensor] = field(default_factory=dict)
    batch: Mapping[str, Any] | None = None  # training only: the collated batch (hint, source image ...)

    @property
    def batch_size(self) -> int:
        """Images in this generation (or training batch)."""
        return len(self.prompts)


@dataclass
class Residuals:
    """What :meth:`Conditioner.residuals` returns: tensors added inside the denoiser network.

    ``down`` is one tensor per skip connection of the UNet (in the order the encoder makes them)
    and ``mid`` the middle block's output; either may be None. The core scales them by the entry's
    ``scale``, zeroes the rows of a guidance branch the entry does not apply to, sums them over all
    conditioners (multi-ControlNet) and passes them to the net as ``down_residuals=`` and
    ``mid_residual=`` (the core UNet, :class:`t2i_engine.nn.unet.UNet`, takes them).
    """

    down: list[Tensor] | None = None
    mid: Tensor | None = None


class Conditioner(Protocol):
    """A ``[[conditioners]]`` entry: ControlNet, T2I-style adapters, InstructPix2Pix's source
    image, or anything that steers the denoiser beside the prompt. See docs/contracts.md.

    Lifecycle (all methods are optional, but a conditioner implements ``condition`` or
    ``residuals`` or both; one with neither is refused when the job starts):

    1. ``factory(config)`` builds it once per run (its ``Config`` from the entry's own keys);
    2. ``setup(model)`` is called once with the run's model bundle (schedule, autoencoder, text
       encoder, denoiser) before anything else;
    3. ``condition(cond, inputs)`` is called once per generation (and per training batch) for
       each branch (``inputs.branch``: ``"cond"`` then ``"uncond"``) and returns ``cond`` with new
       ``extras`` keys added (e.g. the encoded hint); it may not change keys already there;
    4. ``residuals(x_t, t, cond)`` is called at every network evaluation where the entry is
       active (the ``cond`` holds what step 3 added, batched over both guidance branches);
    5. ``precache(batch)`` (only in the ``precache`` task) is called once per collated data batch
       (``image``, ``caption`` and the dataset's further fields, on the run's device) and returns
       fields to store in the shards beside them (what the frozen model computes once, e.g. a
       source image's latent); a training run on those shards finds them in ``inputs.batch``.

    The core owns ``scale``, ``start``/``end`` (the window of sampling steps) and ``branch``
    (keys of every ``[[conditioners]]`` entry): outside the window, at ``scale = 0`` and on
    rows of the other branch, the entry contributes nothing, exactly. Trainable parameters:
    a conditioner that is an ``nn.Module`` with parameters that require grad is trained with
    the model by the ``train`` task (their ``requires_grad`` decides).
    """

    def setup(self, model: LatentDiffusionModel) -> None:
        """Called once per run with the model bundle (optional)."""
        ...

    def condition(self, cond: Conditioning, inputs: ConditionInputs) -> Conditioning:
        """``cond`` with this conditioner's extras added (optional; ``cond.with_extras(...)``)."""
        ...

    def residuals(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Residuals:
        """Residuals for the network's input ``x_t`` at time ``t`` (optional)."""
        ...

    def precache(self, batch: Mapping[str, Any]) -> Mapping[str, Tensor]:
        """Fields the ``precache`` task stores for a data batch (optional)."""
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
        precached ``latents`` and ``text_tokens`` instead of ``image`` and ``caption``. A model
        that can train with ``[[conditioners]]`` also takes ``conditioners=`` (a
        :class:`~t2i_engine.conditioning.ConditionerChain` or None): it conditions each batch with
        ``chain.condition_batch``, calls its network through ``chain.compose(net)`` and adds
        ``chain.trainable_parameters()`` to its own.
        """
        ...

    def save(self, url: str, *, format: str | None = None) -> None:
        """Export the weights to ``url`` in ``format`` (the model's default when None)."""
        ...


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks, sorted (empty when it conforms).

    Use it instead of ``isinstance(obj, protocol)`` for protocols with data members: from Python
    3.12, ``isinstance`` looks them up with ``inspect.getattr_static``, which does not see an
    ``nn.Module``'s submodules, parameters and buffers (they live behind ``__getattr__``), so a
    model whose ``text_encoder`` is a submodule would fail the check. This asks ``hasattr``.
    """
    return sorted(name for name in protocol_members(protocol) if not hasattr(obj, name))


def protocol_members(protocol: type) -> frozenset[str]:
    """The names a ``typing.Protocol`` declares (methods and data members)."""
    members = getattr(protocol, "__protocol_attrs__", None)  # Python >= 3.12
    if members is None:
        members = typing._get_protocol_attrs(protocol)  # type: ignore[attr-defined]  # Python 3.11
    return frozenset(members)


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
    "Branch",
    "ConditionInputs",
    "Conditioner",
    "Conditioning",
    "Denoiser",
    "DenoiserNet",
    "LatentDiffusionModel",
    "NoiseSchedule",
    "Prediction",
    "Residuals",
    "RunContext",
    "Sampler",
    "StepCallback",
    "Task",
    "TextEmbedding",
    "TextEncoder",
    "missing_members",
    "protocol_members",
]
