"""The Stable Diffusion model bundle: text encoder, KL autoencoder, UNet and schedule.

:class:`StableDiffusion` owns the three networks (UNet and autoencoder in the diffusers
parameter layout, the text tower in open_clip's) and the DDPM schedule they were trained with.
Checkpoint formats (:mod:`t2i_plugin_sd.formats`) read files into :class:`Weights` and
:func:`build_model` turns those into a model.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor, nn

from t2i_engine.checkpoint.io import load_state_dict_strict
from t2i_engine.diffusion.schedules import DiscreteSchedule
from t2i_engine.errors import CheckpointError, ConfigError
from t2i_engine.nn import UNet
from t2i_engine.nn.init import skip_weight_init
from t2i_plugin_sd.autoencoder import AutoencoderKL
from t2i_plugin_sd.infer import infer_text, infer_unet, infer_vae
from t2i_plugin_sd.presets import Architecture, ScheduleConfig
from t2i_plugin_sd.text_encoder import CLIPTextEncoder


@attrs.define
class Weights:
    """What a checkpoint format reads: state dicts in our layout and hints from files beside them.

    ``hints`` may hold ``prediction``, ``schedule`` (a ScheduleConfig), ``scaling_factor``,
    ``unet_heads``, ``text_heads``, ``text_activation``, ``text_skip``, ``text_pad``.
    ``extras`` are tensors we do not model (EMA copies, schedule buffers); they are written back
    unchanged when the same format is exported.
    """

    unet: dict[str, Tensor]
    vae: dict[str, Tensor]
    text: dict[str, Tensor]
    hints: dict[str, Any] = attrs.field(factory=dict)
    extras: dict[str, Tensor] = attrs.field(factory=dict)
    source: str = ""


class StableDiffusion(nn.Module):
    """Text encoder + autoencoder + UNet + schedule of one Stable Diffusion model."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self.unet = UNet(arch.unet)
        self.vae = AutoencoderKL(arch.vae)
        self.text_encoder = CLIPTextEncoder(arch.text)
        s = arch.schedule
        self.schedule = DiscreteSchedule.from_betas(s.beta_schedule, num_train_timesteps=s.num_train_timesteps,
                                                    beta_start=s.beta_start, beta_end=s.beta_end,
                                                    rescale_zero_snr=s.rescale_betas_zero_snr,
                                                    spacing=s.timestep_spacing, steps_offset=s.steps_offset,
                                                    scheduler_config=s.scheduler_config)
        self.extras: dict[str, Tensor] = {}
        self.extras_hints: dict[str, Any] = {}  # layout details to write back (key prefixes)

    @property
    def schedule(self) -> DiscreteSchedule:
        """The DDPM schedule the model runs (and exports: setting it updates ``arch.schedule``)."""
        return self._schedule

    @schedule.setter
    def schedule(self, value: DiscreteSchedule) -> None:
        definition = getattr(value, "definition", None)
        if definition is None:
            raise ConfigError("schedule: Stable Diffusion takes a discrete beta schedule built by name "
                              "(linear, scaled_linear, cosine/squaredcos_cap_v2)")
        self.arch = attrs.evolve(self.arch, schedule=ScheduleConfig(
            **definition, scheduler_config=getattr(value, "scheduler_config", None)))
        self._schedule = value

    @property
    def prediction(self) -> str:
        """What the UNet predicts (``eps`` or ``v``)."""
        return self.unet.prediction

    # --- t2i_engine.interfaces.LatentDiffusionModel -----------------------------------------

    @property
    def denoiser(self) -> UNet:
        """The UNet (the protocol's denoiser network)."""
        return self.unet

    @property
    def autoencoder(self) -> AutoencoderKL:
        """The KL autoencoder (the protocol's autoencoder)."""
        return self.vae

    @property
    def description(self) -> str:
        """What sample PNGs record as their ``model``."""
        return f"stable-diffusion ({self.prediction}, context {self.arch.unet.context_dim})"

    def trainable(self, *, caption_dropout: float = 0.1, train_text_encoder: bool = False,
                  conditioners: Any = None) -> nn.Module:
        """This model wrapped for the Fabric loop (:class:`t2i_plugin_sd.trainable.SDTrainable`),
        with the run's ``[[conditioners]]`` chain around the UNet when given."""
        from t2i_plugin_sd.trainable import SDTrainable

        return SDTrainable(self, caption_dropout=caption_dropout, train_text_encoder=train_text_encoder,
                           conditioners=conditioners)

    def lora_key_map(self) -> Any:
        """How LoRA files spell this model's adapter targets (:mod:`t2i_plugin_sd.lora_keys`)."""
        from t2i_plugin_sd.lora_keys import lora_key_map

        return lora_key_map(self)

    def save(self, url: str, *, format: str | None = None, dtype: torch.dtype | None = None) -> None:
        """Export to ``url``: ``"diffusers"`` (a folder, the default) or ``"single-file"``
        (one CompVis-layout safetensors file and its ``.yaml``); floats in ``dtype`` when given."""
        from t2i_plugin_sd.formats import CHECKPOINT_FORMATS

        name = format or "diffusers"
        fmt = CHECKPOINT_FORMATS.get(name)
        if fmt is None or not hasattr(fmt, "save"):
            writable = [n for n, f in CHECKPOINT_FORMATS.items() if hasattr(f, "save")]
            raise ConfigError(f"cannot export Stable Diffusion as {name!r}; formats: {', '.join(writable)}")
        fmt().save(self, url, dtype=dtype)

    def load_weights(self, weights: Weights) -> None:
        """Load state dicts strictly; missing or unexpected keys are a CheckpointError naming them."""
        src = weights.source or "checkpoint"
        load_state_dict_strict(self.unet, weights.unet, source=f"{src} (UNet)")
        load_state_dict_strict(self.vae, weights.vae, source=f"{src} (autoencoder)")
        load_state_dict_strict(self.text_encoder.model, weights.text, source=f"{src} (text encoder)")
        self.extras = dict(weights.extras)
        self.extras_hints = {k: v for k, v in weights.hints.items() if k == "hf_text_prefix"}

    def weights(self) -> Weights:
        """The current weights in our layout (tensors shared, not copied), with every hint
        :func:`architecture_from` needs to rebuild this architecture from them."""
        hints = {"schedule": self.arch.schedule, **architecture_hints(self.arch)}
        return Weights(dict(self.unet.state_dict()), dict(self.vae.state_dict()),
                       dict(self.text_encoder.model.state_dict()), hints, dict(self.extras))


_UNET_HINTS = {"unet_groups": "groups", "unet_norm_eps": "norm_eps", "unet_upcast_attention": "upcast_attention",
               "unet_flip_sin_to_cos": "flip_sin_to_cos", "unet_freq_shift": "freq_shift", "unet_dropout": "dropout",
               "prediction": "prediction"}
_VAE_HINTS = {"vae_groups": "groups", "scaling_factor": "scaling_factor"}
_TEXT_HINTS = {"text_activation": "activation", "text_skip": "skip_last_layers", "text_pad": "pad",
               "text_layer_norm_eps": "layer_norm_eps", "text_pad_to_multiple": "pad_to_multiple"}
"""Hint name -> the architecture field it sets (what the weights' shapes cannot tell)."""


def _apply(config: Any, hints: dict[str, Any], names: dict[str, str]) -> Any:
    return attrs.evolve(config, **{field: hints[name] for name, field in names.items() if name in hints})


def _check_declared(config: Any, declared: dict[str, tuple[str, Any]], *, what: str, source: str) -> None:
    """A field the checkpoint's config declares must be what its weights hold."""
    for field, (name, value) in declared.items():
        held = config.temb_dim if field == "temb_dim" else \
            (config.mlp_width or 4 * config.width) if field == "mlp_width" else \
            config.transformer_depth if field == "depth" else getattr(config, field)
        if field == "depth":  # levels without attention have no transformer to count
            held = tuple(d for d, a in zip(held, config.attention) if a)
            value = tuple(d for d, a in zip(value, config.attention) if a)
        if held != value:
            raise CheckpointError(f"{source}: the {what} config says {name} = {value!r} but the weights hold "
                                  f"{held!r}; the config and the weights do not belong together")


def architecture_hints(arch: Architecture) -> dict[str, Any]:
    """Every architecture field the weights' shapes cannot tell, as hints (what exports record)."""
    hints: dict[str, Any] = {"unet_heads": arch.unet.heads, "text_heads": arch.text.heads}
    for config, names in ((arch.unet, _UNET_HINTS), (arch.vae, _VAE_HINTS), (arch.text, _TEXT_HINTS)):
        hints |= {name: getattr(config, field) for name, field in names.items()}
    return hints


def architecture_from(weights: Weights, base: Architecture, *, overrides: dict[str, Any] | None = None,
                      explicit: bool = False) -> Architecture:
    """Architecture from the weights' shapes; then hints from the checkpoint's files and
    ``overrides`` (the ``[model]`` keys, which win) over ``base``.

    ``explicit`` says the user chose ``base`` (a preset): only then does it supply attention heads
    the checkpoint does not record.
    """
    h = {**weights.hints, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    src = weights.source or "checkpoint"
    heads = tuple(h["unet_heads"]) if "unet_heads" in h else None
    unet = _apply(infer_unet(weights.unet, base.unet, heads=heads, base_heads=explicit), h, _UNET_HINTS)
    vae = _apply(infer_vae(weights.vae, base.vae), h, _VAE_HINTS)
    text = _apply(infer_text(weights.text, base.text, heads=h.get("text_heads"), base_heads=explicit), h, _TEXT_HINTS)
    for config, key, what in ((unet, "unet_declared", "UNet"), (vae, "vae_declared", "autoencoder"),
                              (text, "text_declared", "text encoder")):
        _check_declared(config, h.get(key, {}), what=what, source=src)
    schedule = h.get("schedule", base.schedule)
    assert isinstance(schedule, ScheduleConfig)
    return Architecture(unet, vae, text, schedule)


def build_model(weights: Weights | None, base: Architecture, *, overrides: dict[str, Any] | None = None,
                explicit: bool = False, seed: int = 0) -> StableDiffusion:
    """A model from ``weights`` (architecture inferred; see :func:`architecture_from`) or,
    without weights, the preset with random weights drawn from ``seed``."""
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return StableDiffusion(base).eval()
    arch = architecture_from(weights, base, overrides=overrides, explicit=explicit)
    try:
        with skip_weight_init():  # load_weights replaces every parameter, strictly
            model = StableDiffusion(arch)
    except ValueError as e:  # e.g. GroupNorm groups that do not divide a level's channels
        raise CheckpointError(f"{weights.source or 'checkpoint'}: cannot build this architecture: {e}") from e
    model.load_weights(weights)
    return model.eval()
