"""One Imagen cascade stage: an Imagen UNet (base or super-resolution), its T5 text encoder, its
preconditioning (EDM or continuous DDPM) and, for super-resolution, the low-resolution input and
its noise conditioning augmentation.

:class:`ImagenStage` fulfils :class:`t2i_engine.interfaces.LatentDiffusionModel` with an identity
autoencoder, so the core's ``train`` task trains any stage and the core's ``sample`` task samples a
base stage; :mod:`t2i_plugin_imagen.cascade` chains stages. A stage is saved as one safetensors
file (``unet.*``, ``text_encoder.*``) whose metadata holds every key that shapes its computation;
:func:`load_imagen_stage` reads them all back or fails naming what it cannot use.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.checkpoint.io import load_state_dict_strict, save_safetensors
from t2i_engine.diffusion.parameterization import scalings
from t2i_engine.errors import CheckpointError, ConfigError
from t2i_engine.nn.init import skip_weight_init
from t2i_plugin_imagen.autoencoder import IdentityAutoencoder
from t2i_plugin_imagen.imagen_unet import EfficientUNet, ImagenUNet, build_unet, unet_options
from t2i_plugin_imagen.precond import Preconditioning
from t2i_plugin_imagen.text_encoder import T5TextEncoder
from t2i_plugin_imagen.word_t5 import WordT5Config, build_word_t5

FORMAT = "t2i-imagen-stage/1"


@attrs.frozen(kw_only=True)
class NoiseAugConfig:
    """Noise conditioning augmentation of the low-resolution input (Imagen sec. 2.5; Ho et al.
    2022 "Cascaded Diffusion Models"): ``lowres + sigma_aug * noise``, scaled by the
    preconditioning's ``c_in(sigma_aug)``, its level's time input given to the UNet.

    Levels are sigmas in the core's convention (``x = x0 + sigma * noise``)."""

    train: Literal["schedule", "loguniform"] = attrs.field(
        default="schedule", validator=attrs.validators.in_(("schedule", "loguniform")))
    # schedule: the preconditioning's own training sigmas (NeMo's EDM: log-normal P_mean, P_std);
    # loguniform: log sigma uniform in [sigma_min, sigma_max]
    sigma_min: float = attrs.field(default=0.002, converter=float, validator=attrs.validators.gt(0.0))
    sigma_max: float = attrs.field(default=1.0, converter=float, validator=attrs.validators.gt(0.0))
    sample_sigma: float = attrs.field(default=0.002, converter=float, validator=attrs.validators.gt(0.0))
    # the fixed level at inference (NeMo: 0.002), unless the cascade stage sets aug_level

    def training_sigmas(self, batch: int, schedule: Any, *, generator: torch.Generator | None) -> Tensor:
        """``(B,)`` augmentation levels for a training batch (CPU float32, drawn from ``generator``)."""
        if self.train == "schedule":
            return schedule.sample_training_sigmas(batch, generator=generator).float().cpu()
        device = generator.device if generator is not None else None
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64).cpu()
        lo, hi = torch.tensor(self.sigma_min).log(), torch.tensor(self.sigma_max).log()
        return (lo + (hi - lo) * u).exp().float()


def lowres_extras(lowres: Tensor, size: tuple[int, int], *, prediction: str, sigma_data: float, schedule: Any,
                  aug_sigma: Tensor | None, noise: Tensor | None) -> dict[str, Tensor]:
    """``extras`` of a super-resolution UNet: ``lowres`` ``(B, 3, h, w)`` in [-1, 1] upsampled
    (bicubic, NeMo) to ``size``, noised to ``aug_sigma`` ``(B,)`` and scaled by ``c_in``, and
    ``lowres_t``, the level's time input; without ``aug_sigma``, the upsampled image as it is."""
    up = F.interpolate(lowres, size=size, mode="bicubic")  # (B, 3, H, W)
    if aug_sigma is None:
        return {"lowres": up}
    s = aug_sigma.to(up).reshape(-1, 1, 1, 1)
    _, _, c_in = scalings(prediction, s, sigma_data=sigma_data)  # type: ignore[arg-type]
    noisy = up + s * noise.to(up)  # type: ignore[union-attr]
    return {"lowres": noisy * c_in, "lowres_t": schedule.sigma_to_t(aug_sigma.to(up.device)).to(up)}


def downsample(images: Tensor, size: int) -> Tensor:
    """Training's low-resolution input: ``images`` resized to ``size`` (bilinear, antialiased)."""
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class ImagenStage(nn.Module):
    """An Imagen stage (see the module docstring).

    Args:
        unet: :class:`ImagenUNet` or :class:`EfficientUNet`.
        text_encoder: the T5 encoder (its ``zero_empty`` makes ``""`` the zero null text).
        precond: EDM or continuous DDPM (:class:`~t2i_plugin_imagen.precond.Preconditioning`).
        image_size: the side this stage generates.
        lowres_size: the side of its low-resolution input (super-resolution), else None.
        noise_aug: augmentation of that input (used when the UNet has ``noise_cond_aug``).
        text: the word-level T5 keys (saved with the stage).
    """

    def __init__(self, unet: ImagenUNet | EfficientUNet, text_encoder: T5TextEncoder, precond: Preconditioning, *,
                 image_size: int, lowres_size: int | None = None, noise_aug: NoiseAugConfig | None = None,
                 text: WordT5Config | None = None) -> None:
        super().__init__()
        needs_lowres = isinstance(unet, EfficientUNet) or bool(getattr(unet.config, "low_res_cond", False))
        if needs_lowres != (lowres_size is not None):
            raise ConfigError("an Imagen super-resolution UNet needs lowres_size (and a base UNet takes none)")
        if text_encoder.dim != unet.config.text_embed_dim:
            raise ConfigError(f"the T5 width {text_encoder.dim} is not the UNet's text_embed_dim {unet.config.text_embed_dim}")
        self.unet, self.text_encoder, self.precond = unet, text_encoder, precond
        unet.prediction = precond.prediction
        self.denoiser = unet
        self.schedule = precond.schedule()
        self.autoencoder = IdentityAutoencoder()
        self.image_size, self.lowres_size = image_size, lowres_size
        self.noise_aug = noise_aug or NoiseAugConfig()
        self.text = text
        self.save_dtype = "float32"  # what save() writes by default ("float16" halves the file)

    @property
    def description(self) -> str:
        """What sample PNGs record as their ``model``."""
        kind = f"super-resolution {self.lowres_size}->{self.image_size}" if self.lowres_size else f"base {self.image_size}"
        return f"imagen {kind} ({self.precond.kind})"

    @property
    def augments(self) -> bool:
        """Whether the UNet is conditioned on the augmentation level of its low-res input."""
        return bool(self.unet.config.noise_cond_aug)

    def lowres_conditioning(self, lowres: Tensor, *, aug_sigma: Tensor | None, noise: Tensor | None) -> dict[str, Tensor]:
        """The ``extras`` for ``lowres`` at this stage's size (augmented when the UNet is)."""
        return lowres_extras(lowres, (self.image_size, self.image_size), prediction=self.precond.prediction,
                             sigma_data=self.precond.sigma_data, schedule=self.schedule,
                             aug_sigma=aug_sigma if self.augments else None, noise=noise)

    def set_sampling_range(self, *, sigma_min: float | None = None, sigma_max: float | None = None) -> None:
        """Sample between other noise levels than the stage file's (EDM stages: the Karras sigmas run
        from ``sigma_max`` down to ``sigma_min``, then a last step to 0); None keeps the stage's value.

        A stage whose denoiser is weak at small sigmas (a small network that has not learnt to remove
        fine noise) leaves that noise in its images when the sampler walks down to 0.002; ending at
        a larger ``sigma_min`` makes the last step the denoiser's estimate from there instead."""
        changes = {k: float(v) for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)) if v is not None}
        if not changes:
            return
        if self.precond.kind != "edm":
            raise ConfigError(f"sigma_min / sigma_max set the EDM sampling range; {self.description} samples a "
                              "continuous-DDPM time grid (its steps are the sampler's)")
        lo, hi = changes.get("sigma_min", self.precond.sigma_min), changes.get("sigma_max", self.precond.sigma_max)
        if not 0 < lo < hi:
            raise ConfigError(f"the sampling range needs 0 < sigma_min < sigma_max, got sigma_min {lo}, sigma_max {hi}")
        self.precond = attrs.evolve(self.precond, **changes)
        self.schedule = self.precond.schedule()

    def trainable(self, *, caption_dropout: float = 0.1, train_text_encoder: bool = False) -> nn.Module:
        """The stage for the core's training loop (:class:`~t2i_plugin_imagen.trainable.ImagenTrainable`)."""
        from t2i_plugin_imagen.trainable import ImagenTrainable

        return ImagenTrainable(self, caption_dropout=caption_dropout, train_text_encoder=train_text_encoder)

    def metadata(self) -> dict[str, str]:
        """Everything that shapes the stage's computation, as safetensors metadata."""
        if self.text is None:
            raise ConfigError("saving an Imagen stage needs its word-level T5 keys (user T5 folders are not saved)")
        kind, unet = unet_options(self.unet)
        return {"format": FORMAT, "unet_type": kind, "unet": json.dumps(unet),
                "text": json.dumps(attrs.asdict(self.text)), "precond": json.dumps(attrs.asdict(self.precond)),
                "noise_aug": json.dumps(attrs.asdict(self.noise_aug)), "image_size": str(self.image_size),
                "lowres_size": json.dumps(self.lowres_size)}

    def save(self, url: str, *, format: str | None = None, dtype: torch.dtype | None = None) -> None:
        """Write the stage as one safetensors file (``format`` None or ``"imagen-stage"``)."""
        if format not in (None, "imagen-stage"):
            raise ConfigError(f"an Imagen stage saves as 'imagen-stage' safetensors, not {format!r}")
        tensors = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        tensors |= {f"text_encoder.{k}": v for k, v in self.text_encoder.model.state_dict().items()}
        dtype = dtype or getattr(torch, self.save_dtype)
        save_safetensors(tensors, url, metadata=self.metadata(), dtype=dtype)


def build_stage(*, unet_type: str, unet: dict[str, Any], text: WordT5Config, precond: Preconditioning,
                image_size: int, lowres_size: int | None, noise_aug: NoiseAugConfig | None = None,
                seed: int = 0) -> ImagenStage:
    """A freshly initialised stage (seeded) from its keys."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_unet(unet_type, dict(unet))
    return ImagenStage(net, build_word_t5(text, seed=seed + 1), precond, image_size=image_size,
                       lowres_size=lowres_size, noise_aug=noise_aug, text=text)


def _meta_json(meta: dict[str, str], key: str, url: str) -> Any:
    if key not in meta:
        raise CheckpointError(f"{url}: the Imagen stage metadata lacks '{key}'")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{url}: metadata '{key}' is not JSON ({e})") from e


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (an 8-byte header length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8:8 + size]).get("__metadata__") or {})


def _read_stage_file(url: str) -> tuple[dict[str, str], dict[str, dict[str, Tensor]]]:
    """``(metadata, {"unet": state, "text_encoder": state})`` of a stage file (float32 tensors)."""
    from safetensors.torch import load

    from t2i_engine.checkpoint.io import read_bytes

    data = read_bytes(url)
    try:
        tensors, meta = load(data), safetensors_metadata(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{url} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{url}: not an Imagen stage file (metadata format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    parts: dict[str, dict[str, Tensor]] = {"unet": {}, "text_encoder": {}}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head not in parts:
            raise CheckpointError(f"{url}: unexpected tensor {key!r} (an Imagen stage has unet.* and text_encoder.*)")
        parts[head][rest] = value.float()
    return meta, parts


def load_text_encoder(stage: ImagenStage, url: str) -> None:
    """Replace ``stage``'s T5 weights by those of the stage file ``url`` (its keys must be the same)."""
    meta, parts = _read_stage_file(url)
    theirs = WordT5Config(**_meta_json(meta, "text", url))
    if theirs != stage.text:
        raise ConfigError(f"model.text_from: the text encoder of {url} ({theirs}) differs from model.text ({stage.text})")
    load_state_dict_strict(stage.text_encoder.model, parts["text_encoder"], source=f"{url} (text_encoder)")


def stage_text_config(url: str) -> WordT5Config:
    """The word-level T5 keys of the stage file ``url``."""
    meta, _ = _read_stage_file(url)
    return WordT5Config(**_meta_json(meta, "text", url))


def load_imagen_stage(url: str) -> ImagenStage:
    """A stage from a safetensors file written by :meth:`ImagenStage.save` (float32 weights)."""
    meta, parts = _read_stage_file(url)
    try:
        text = WordT5Config(**_meta_json(meta, "text", url))
        precond = Preconditioning(**_meta_json(meta, "precond", url))
        aug = NoiseAugConfig(**_meta_json(meta, "noise_aug", url))
        with skip_weight_init():  # the strict loads below replace every parameter (UNet and T5)
            stage = build_stage(unet_type=meta.get("unet_type", ""), unet=_meta_json(meta, "unet", url), text=text,
                                precond=precond, image_size=int(_meta_json(meta, "image_size", url)),
                                lowres_size=_meta_json(meta, "lowres_size", url), noise_aug=aug)
    except (TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{url}: cannot rebuild the Imagen stage from its metadata: {e}") from e
    load_state_dict_strict(stage.unet, parts["unet"], source=f"{url} (unet)")
    load_state_dict_strict(stage.text_encoder.model, parts["text_encoder"], source=f"{url} (text_encoder)")
    return stage.eval()
