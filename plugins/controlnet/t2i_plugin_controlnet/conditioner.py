"""The ``controlnet`` conditioner: a hint image -> residuals for the UNet's skips and middle block.

::

    [[conditioners]]
    type = "controlnet"
    checkpoint = "controlnet-canny"          # a diffusers ControlNetModel folder
    inputs = { image = "edges.png" }         # the hint (RGB, at the output size)
    scale = 0.7                              # the core's keys: scale, start, end, branch
    guess_mode = true                        # with branch = "cond": diffusers' guess mode

The core applies ``scale``, the ``start``/``end`` step window and the guidance ``branch``, and sums
the residuals of several entries (multi-ControlNet); this module runs the network.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import attrs
from torch import Tensor, nn

from t2i_plugin_controlnet.annotators import ANNOTATORS, build_annotator
from t2i_sdk import ConditionInputs, Conditioning, ConfigError, Residuals, existing_path, option

__all__ = ["ControlNetConditioner", "ControlNetConditionerConfig"]

HINT_INPUT = "image"
"""The name of the hint in the entry's ``inputs`` table."""

_ids = itertools.count()


def _known_annotator(name: str) -> None:
    if name not in ANNOTATORS:
        raise ValueError(f"'annotator' must be one of {', '.join(ANNOTATORS)}, got {name!r}")
_unit = [attrs.validators.gt(0.0), attrs.validators.le(1.0)]


@attrs.frozen
class ControlNetConditionerConfig:
    """The ``controlnet`` entry's own keys (the core's are ``scale``, ``start``, ``end``,
    ``branch`` and ``inputs``)."""

    checkpoint: str = existing_path(help="a diffusers ControlNetModel folder, or an lllyasviel .pth/.safetensors file")
    guess_mode: bool = option(default=False, help="scale the residuals shallow to deep (0.1 ... 1); pair "
                                                  "with branch = \"cond\" for diffusers' guess mode")
    guess_mode_law: Literal["diffusers", "original"] = option(
        default="diffusers", help="guess-mode scales: diffusers' logspace(-1, 0, 13) or the original 0.825 ** (12 - i)")
    global_average_pooling: bool | None = option(
        default=None, help="average every residual over H and W (shuffle models); default: the checkpoint's")
    channel_order: Literal["rgb", "bgr"] | None = option(
        default=None, help="channel order the network expects the hint in; default: the checkpoint's")
    annotator: str = option(default="none", validator=lambda _i, _a, v: _known_annotator(v),
                            help="hint maker applied to the image: none (it is the hint), canny (edges), inpaint "
                                 "(masked pixels -1), depth_midas (MiDaS DPT-Hybrid depth)")
    midas_weights: str | None = existing_path(default=None, help="depth_midas: the dpt_hybrid-midas-501f0c75.pt "
                                                                 "file (nothing is downloaded)")
    canny_low: float = option(default=0.1, validator=_unit, help="canny: low hysteresis threshold (kornia's units)")
    canny_high: float = option(default=0.2, validator=_unit, help="canny: high hysteresis threshold (kornia's units)")
    only_mid_control: bool | None = option(default=None, help="add only the middle block's residual, none to the "
                                           "skips (the original code's only_mid_control); default: the checkpoint's")

    def __attrs_post_init__(self) -> None:
        if self.canny_low >= self.canny_high:
            raise ValueError(f"'canny_high' must be greater than canny_low ({self.canny_low}), got {self.canny_high}")


class ControlNetConditioner(nn.Module):
    """A ControlNet as a conditioner (:class:`t2i_sdk.Conditioner`): ``condition()`` adds the
    hint (RGB in [0, 1]) to the conditioning, ``residuals()`` runs the network on the noisy
    latents, the timestep and the text context.

    As a job's entry its weights are frozen and come from ``checkpoint``; the ``controlnet-train``
    task gives it a network (``loaded``) and ``trainable=True``, and its training batches carry
    the hint under ``batch_key``."""

    Config = ControlNetConditionerConfig

    def __init__(self, config: ControlNetConditionerConfig, *, loaded: Any = None, trainable: bool = False,
                 batch_key: str = "hint") -> None:
        super().__init__()
        self.config = config
        self.key = f"controlnet_hint_{next(_ids)}"  # one extras key per entry: several may run together
        self.net: Any = None  # loaded by setup(model): original-layout files take the base UNet's architecture
        self.loaded = loaded  # a LoadedControlNet given by a training task, used instead of the checkpoint
        self.trainable = trainable
        self.batch_key = batch_key
        self.annotator: Any = None  # built on first use (depth_midas loads its weights once)
        self.channel_order = config.channel_order or "rgb"
        self.global_pool = bool(config.global_average_pooling)
        self.only_mid = bool(config.only_mid_control)

    def setup(self, model: Any) -> None:
        """Load the checkpoint (unless a network was given) and check that it fits the model's
        UNet (levels, context width, latent factor)."""
        from t2i_plugin_controlnet.formats import load_controlnet

        unet = model.denoiser
        cfg = getattr(unet, "config", None)
        if cfg is None or not hasattr(cfg, "channels"):
            raise ConfigError(f"{self.config.checkpoint}: ControlNet needs the core UNet as the model's denoiser, "
                              f"got {type(unet).__name__}")
        loaded = self.loaded if self.loaded is not None else load_controlnet(self.config.checkpoint, base=unet)
        own = loaded.net.config
        for what, mine, theirs in (("channels per level", own.unet.channels, cfg.channels),
                                   ("ResBlocks per level", own.unet.layers_per_block, cfg.layers_per_block),
                                   ("text context width", own.unet.context_dim, cfg.context_dim)):
            if mine != theirs:
                raise ConfigError(f"{self.config.checkpoint}: the ControlNet has {what} {mine} but the model's "
                                  f"UNet {theirs}; it was made for another base model")
        factor = model.autoencoder.downsample_factor
        if own.hint_factor != factor:
            raise ConfigError(f"{self.config.checkpoint}: the hint encoder shrinks images {own.hint_factor}x but the "
                              f"model's autoencoder {factor}x; the ControlNet does not fit this model")
        param = next(unet.parameters(), None)
        self.net = loaded.net.requires_grad_(self.trainable).to(param.device if param is not None else "cpu")
        self.channel_order = self.config.channel_order or loaded.channel_order
        self.global_pool = loaded.global_pool if self.config.global_average_pooling is None \
            else self.config.global_average_pooling
        self.only_mid = loaded.only_mid_control if self.config.only_mid_control is None else self.config.only_mid_control
        self.annotator = build_annotator(self.config)  # a missing file or package fails here, named

    def condition(self, cond: Conditioning, inputs: ConditionInputs) -> Conditioning:
        """Add the hint ``(B, 3, H, W)`` in [0, 1] (from the entry's ``inputs.image``, loaded in [-1, 1])."""
        image = inputs.images.get(HINT_INPUT)
        if image is None and inputs.batch is not None and self.batch_key in inputs.batch:  # training
            image = inputs.batch[self.batch_key].to(inputs.device, inputs.dtype)
        if image is None and inputs.batch is not None:
            fields = ", ".join(sorted(str(k) for k in inputs.batch)) or "none"
            raise ConfigError(f"controlnet: the training batch has no hint '{self.batch_key}' (its fields: {fields}); "
                              "name the dataset's hint field with the task's hint_key")
        if image is None:
            given = ", ".join(sorted(inputs.images)) or "none"
            raise ConfigError(f"controlnet: the hint image is missing: give it as inputs = {{ {HINT_INPUT} = "
                              f"\"path or URL\" }} in the [[conditioners]] entry (inputs given: {given})")
        if image.shape[1] != self.net.config.hint_channels:
            raise ConfigError(f"controlnet: the hint has {image.shape[1]} channels, the network takes "
                              f"{self.net.config.hint_channels}")
        if self.annotator is None:
            self.annotator = build_annotator(self.config)
        hint = self.annotator((image + 1) / 2, inputs=inputs.images)
        if self.channel_order == "bgr":
            hint = hint.flip(1)
        return cond.with_extras(**{self.key: hint})

    def residuals(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Residuals:
        """The network's residuals for the UNet at ``(x_t, t)``, with guess-mode scales and pooling."""
        from t2i_plugin_controlnet.network import guess_mode_scales

        hint = cond.extras[self.key]
        f = self.net.config.hint_factor
        if tuple(hint.shape[-2:]) != (x_t.shape[-2] * f, x_t.shape[-1] * f):
            raise ConfigError(f"controlnet: the hint is {tuple(hint.shape[-2:])} pixels but the latents "
                              f"{tuple(x_t.shape[-2:])} need {(x_t.shape[-2] * f, x_t.shape[-1] * f)}")
        context = mask = None
        if cond.text is not None:
            context = cond.text.tokens.to(x_t.dtype)
            mask = cond.text.mask if self.net.config.unet.use_text_mask else None
        down, mid = self.net(x_t, t, context, hint, mask=mask)
        if self.config.guess_mode and not self.global_pool:  # diffusers: pooling models skip the law
            scales = guess_mode_scales(len(down) + 1, law=self.config.guess_mode_law).tolist()
            down = [r * s for r, s in zip(down, scales, strict=False)]
            mid = mid * scales[-1]
        if self.global_pool:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return Residuals(down=None if self.only_mid else down, mid=mid)
