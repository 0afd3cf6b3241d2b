"""The DeepFloyd IF model bundle: one pixel-space stage (T5 text, IF UNet, DDPM schedule).

:class:`IFStage` fulfils :class:`t2i_engine.interfaces.LatentDiffusionModel` with an identity
autoencoder, so the core's ``sample`` task drives stage I (with the core's samplers and the eps
half of the UNet). :meth:`IFStage.generate` is IF's own sampling (learned-range variance,
thresholding with a ceiling, stage II's noised low-resolution input), which reproduces
diffusers' ``IFPipeline`` / ``IFSuperResolutionPipeline``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from t2i_engine.errors import CheckpointError, ConfigError
from t2i_engine.interfaces import Conditioning
from t2i_engine.pipeline import encode_prompts
from t2i_plugin_imagen.autoencoder import IdentityAutoencoder
from t2i_plugin_imagen.if_folder import load_if_unet, read_json
from t2i_plugin_imagen.if_schedule import IFSchedulerConfig, if_scheduler_config
from t2i_plugin_imagen.if_unet import IFUNet
from t2i_plugin_imagen.sampling import IFEpsNet, noise_lowres, sample_stage, stage_two_conditioning
from t2i_plugin_imagen.text_encoder import T5TextEncoder


class IFStage(nn.Module):
    """One DeepFloyd IF stage: ``stage`` 1 (text -> 64 px) or 2 (64 -> 256 px super-resolution).

    ``noising`` is stage II's ``image_noising_scheduler`` (the schedule of the low-resolution
    image's augmentation noise); None for stage I. ``sample_size`` is the side the UNet was
    trained at (``unet/config.json``; IF: 64 for stage I, 256 for stage II), the size a cascade
    samples it at; None where the config has no square size.
    """

    def __init__(self, unet: IFUNet, text_encoder: T5TextEncoder, scheduler: IFSchedulerConfig, *,
                 noising: IFSchedulerConfig | None = None, sample_size: int | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.scheduler = scheduler
        self.schedule = scheduler.schedule()
        self.noising = noising
        self.sample_size = sample_size
        self.denoiser = IFEpsNet(unet)
        self.autoencoder = IdentityAutoencoder()
        self.stage = 2 if unet.config.class_embed else 1
        if self.stage == 2 and noising is None:
            raise CheckpointError("an IF stage II UNet needs the image_noising_scheduler")

    @property
    def description(self) -> str:
        """What sample PNGs record as their ``model``."""
        return f"deepfloyd-if stage {'I' if self.stage == 1 else 'II'}"

    def trainable(self, *, caption_dropout: float = 0.1, train_text_encoder: bool = False) -> nn.Module:
        """Not there yet: IF stages are sampled, not trained, by this version of the plugin."""
        raise ConfigError("training an IF stage is not supported yet by t2i-plugin-imagen (sampling only)")

    def save(self, url: str, *, format: str | None = None) -> None:
        """Not there yet: the weights are the user's diffusers folder, loaded as they are."""
        raise ConfigError("exporting an IF stage is not supported yet by t2i-plugin-imagen")

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], noise: Tensor, *, steps: int = 100, guidance_scale: float = 7.0,
                 negative_prompts: Sequence[str] | None = None, lowres: Tensor | None = None,
                 noise_level: int = 250, dynamic_threshold: float | None = None,
                 dynamic_threshold_max: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Images ``(B, 3, H, W)`` in about [-1, 1], as IF samples them.

        Args:
            prompts: one prompt per image.
            noise: unit-variance starting noise ``(B, 3, H, W)``; its size sets the image size.
            steps: DDPM steps (IF: 100 for stage I, 50 for stage II).
            guidance_scale: CFG scale on the eps half (IF: 7 for stage I, 4 for stage II); <= 1 is off.
            negative_prompts: the unconditional branch's prompts (default ``""``).
            lowres: stage II only: the stage I images ``(B, 3, h, w)`` in [-1, 1].
            noise_level: stage II only: the augmentation timestep of ``lowres`` (IF: 250).
            dynamic_threshold: the thresholding percentile p in place of the scheduler config's
                ``dynamic_thresholding_ratio`` (thresholding on even where the config has it off).
            dynamic_threshold_max: the ceiling of the threshold ``s`` in place of the scheduler
                config's ``sample_max_value`` (needs ``dynamic_threshold``).
            generator: the randomness, drawn in IF's order (stage II: the augmentation noise
                first, then each step's noise).
        """
        if noise.ndim != 4 or noise.shape[1] != 3:
            raise ValueError(f"noise must be (B, 3, H, W), got {tuple(noise.shape)}")
        cond, uncond = encode_prompts(self.text_encoder, prompts, negative_prompts)
        if len(prompts) != noise.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {noise.shape[0]} noise tensors")
        if self.stage == 2:
            if lowres is None:
                raise ValueError("IF stage II needs lowres= (the stage I images)")
            if lowres.ndim != 4 or lowres.shape[:2] != noise.shape[:2]:
                raise ValueError(f"lowres must be (B, 3, h, w) with B = {noise.shape[0]}, got {tuple(lowres.shape)}")
            if not 0 <= noise_level < self.noising.num_train_timesteps:  # type: ignore[union-attr]
                raise ValueError(f"noise_level must be in [0, {self.noising.num_train_timesteps}), "  # type: ignore[union-attr]
                                 f"got {noise_level}")
            aug = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=noise.device)
            lowres = noise_lowres(lowres.to(noise), tuple(noise.shape[-2:]), noise_level=noise_level,
                                  schedule=self.noising.schedule(), noise=aug)  # type: ignore[union-attr]
            cond, uncond = (stage_two_conditioning(c, lowres, noise_level) for c in (cond, uncond))
        elif lowres is not None:
            raise ValueError("lowres= is for IF stage II; this is stage I")
        config = self.thresholded(dynamic_threshold, dynamic_threshold_max)
        return sample_stage(self.denoiser, config, cond=cond, uncond=uncond, noise=noise, steps=steps,
                            guidance_scale=guidance_scale, generator=generator)

    def thresholded(self, percentile: float | None, ceiling: float | None) -> IFSchedulerConfig:
        """The scheduler config with its dynamic thresholding replaced where ``percentile`` /
        ``ceiling`` are given (the config's own otherwise)."""
        if percentile is None:
            if ceiling is not None:
                raise ValueError("dynamic_threshold_max needs dynamic_threshold (the percentile)")
            return self.scheduler
        changes: dict[str, Any] = {"thresholding": True, "dynamic_thresholding_ratio": float(percentile)}
        if ceiling is not None:
            changes["sample_max_value"] = float(ceiling)
        return attrs.evolve(self.scheduler, **changes)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """The conditioning of ``prompts`` (T5 hidden states and mask)."""
        return Conditioning(text=self.text_encoder.encode(prompts))


def load_if_stage(folder: str | Path, *, max_length: int = 77, text_encoder: T5TextEncoder | None = None) -> IFStage:
    """An IF stage from a diffusers ``IFPipeline`` / ``IFSuperResolutionPipeline`` folder.

    ``text_encoder`` is used only where the folder has no ``text_encoder/`` (a stage II folder
    saved with ``text_encoder=None``, whose users pass stage I's prompt embeddings): give stage
    I's. Without either, a CheckpointError names the folder.
    """
    root = Path(folder)
    if not (root / "unet").is_dir():
        raise CheckpointError(f"{root}: not a diffusers IF folder (no unet/)")
    unet_config = read_json(root / "unet" / "config.json")
    unet = load_if_unet(root / "unet", raw_config=unet_config)
    scheduler = if_scheduler_config(read_json(root / "scheduler" / "scheduler_config.json"),
                                    source=str(root / "scheduler" / "scheduler_config.json"))
    noising = None
    if (root / "image_noising_scheduler").is_dir():
        path = root / "image_noising_scheduler" / "scheduler_config.json"
        noising = if_scheduler_config(read_json(path), source=str(path))
    if (root / "text_encoder").is_dir():
        source = "T5"
        text = T5TextEncoder.from_folders(root / "text_encoder", root / "tokenizer", max_length=max_length)
    elif text_encoder is not None:
        text, source = text_encoder, "lent T5 (no text_encoder/ here)"
    else:
        raise CheckpointError(f"{root}: no text_encoder/ (a folder saved without its T5); give the T5 of the "
                              "stage I folder (load_if_stage(..., text_encoder=stage1.text_encoder))")
    if text.dim != unet.config.encoder_hid_dim:
        raise CheckpointError(f"{root}: the {source} width {text.dim} is not the UNet's encoder_hid_dim "
                              f"{unet.config.encoder_hid_dim}")
    size = _sample_size(unet_config.get("sample_size"))
    return IFStage(unet, text, scheduler, noising=noising, sample_size=size).eval()


def _sample_size(value: Any) -> int | None:
    """``unet/config.json``'s ``sample_size`` as one side (None where absent or not square)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None
