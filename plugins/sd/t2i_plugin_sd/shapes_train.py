"""``shapes-train``: a whole tiny Stable Diffusion trained from scratch on the shapes dataset.

Two stages, each through the core Fabric loop :func:`~t2i_engine.training.loop.fit` with its own
resumable checkpoints (``<output_dir>/autoencoder`` and ``<output_dir>/unet``):

1. the KL autoencoder (f = 8, 4 latent channels) with L1 + a small KL term
   (:mod:`t2i_plugin_sd.autoencoder_training`), configured by ``[task.autoencoder]``;
2. the UNet and the CLIP-architecture text encoder jointly, on latents of the frozen autoencoder
   encoded once into memory, configured by ``[train]``.

The result is one CompVis-layout safetensors file (the EMA weights, stored as float16 to keep the
file small) and a latent-diffusion ``.yaml`` beside it with the prediction type, latent scale
factor and schedule, which the ``single-file`` format reads back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from t2i_engine.config.fields import option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_engine.training.config import TrainConfig
from t2i_plugin_sd.presets import PRESETS

__all__ = ["ShapesTrainConfig", "ShapesTrainTask", "load_final_weights"]




@attrs.frozen
class ShapesTrainConfig:
    """``[task] name = "shapes-train"``; the UNet stage is configured by ``[train]``."""

    output: str = option(help="the single-file safetensors to write (relative to the config file)")
    preset: Literal["shapes-64"] = option(default="shapes-64", help="architecture")
    autoencoder: TrainConfig = option(factory=TrainConfig, help="the [train] keys of the autoencoder stage")
    kl_weight: float = option(default=1e-3, validator=attrs.validators.ge(0.0), help="KL weight (stage 1)")
    caption_dropout: float = option(default=0.1, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)],
                                    help="probability a caption is replaced by '' (stage 2)")
    latent_samples: int = option(default=8192, validator=attrs.validators.ge(1),
                                 help="dataset samples encoded once for the UNet stage")
    save_dtype: Literal["float16", "float32"] = option(default="float16", help="dtype of the written tensors")


class LatentDataset(Dataset):
    """Precomputed scaled latents ``(C, h, w)`` with their captions (the UNet stage's data)."""

    def __init__(self, latents: Tensor, captions: list[str]) -> None:
        self.latents, self.captions = latents, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latents": self.latents[index], "caption": self.captions[index]}


@torch.no_grad()
def encode_dataset(vae: nn.Module, dataset: Any, *, count: int, batch_size: int = 64) -> LatentDataset:
    """Posterior means of the first ``count`` samples, scaled by ``vae.scaling_factor``."""
    latents, captions = [], []
    device = next(vae.parameters()).device
    for start in range(0, count, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        images = torch.stack([s["image"] for s in samples]).to(device)  # (B, 3, H, W)
        latents.append(vae.moments(images)[0].cpu() * vae.scaling_factor)  # (B, C, h, w)
        captions += [s["caption"] for s in samples]
    return LatentDataset(torch.cat(latents), captions)


def load_final_weights(model: nn.Module, checkpoint_dir: str, *, ema: bool) -> None:
    """Load the latest checkpoint of a finished stage into ``model`` (its EMA weights when ``ema``)."""
    from t2i_engine.checkpoint.io import load_state_dict_strict
    from t2i_engine.training.checkpoints import latest_checkpoint, load_checkpoint

    step = latest_checkpoint(checkpoint_dir)
    if step is None:
        raise ConfigError(f"no checkpoint in {checkpoint_dir}")
    state, ema_state, _ = load_checkpoint(checkpoint_dir, step, with_ema=ema)
    load_state_dict_strict(model, {**state, **(ema_state or {})}, source=f"{checkpoint_dir} step {step}")


def _resolve(ctx: RunContext, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and ctx.config.source is not None:
        p = Path(ctx.config.source).parent / p
    return p


class ShapesTrainTask:
    """Train the autoencoder, then the UNet and text encoder; export one safetensors file."""

    Config = ShapesTrainConfig

    def __init__(self, config: ShapesTrainConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.training.loop import fit, interrupted
        from t2i_plugin_sd.autoencoder_training import AutoencoderTrainable, latent_scaling_factor
        from t2i_plugin_sd.model import build_model
        from t2i_plugin_sd.trainable import SDTrainable

        c = self.config
        if ctx.config.data is None or ctx.config.train is None:
            raise ConfigError("the shapes-train task needs [data] and [train] tables")
        dataset = ctx.plugins.build(ctx.config.data)
        hooks = getattr(ctx.plugins, "hook", None)
        model = build_model(None, PRESETS[c.preset], seed=ctx.seed)

        # stage 1: the autoencoder
        ae = AutoencoderTrainable(model.vae, kl_weight=c.kl_weight)
        ae_dir = ctx.output_dir / "autoencoder"
        ae_summary = fit(ae, dataset, c.autoencoder, output_dir=ae_dir, seed=ctx.seed, hooks=hooks)
        if interrupted(ae_summary):
            return {"stage": "autoencoder", **ae_summary}
        load_final_weights(ae, str(ae_dir / "checkpoints"), ema=c.autoencoder.ema)
        model.vae.requires_grad_(False).eval()

        # stage 2: UNet + text encoder on latents encoded once
        n_scale = min(c.latent_samples, 1024)
        scale = latent_scaling_factor(model.vae, (torch.stack([dataset[i]["image"] for i in range(s, min(s + 64, n_scale))])
                                                  for s in range(0, n_scale, 64)))
        model.vae.scaling_factor = scale
        model.arch = attrs.evolve(model.arch, vae=attrs.evolve(model.arch.vae, scaling_factor=scale))
        latents = encode_dataset(model.vae, dataset, count=min(c.latent_samples, len(dataset)))
        sd = SDTrainable(model, caption_dropout=c.caption_dropout, train_text_encoder=True)
        unet_dir = ctx.output_dir / "unet"
        summary = fit(sd, latents, ctx.config.train, output_dir=unet_dir, seed=ctx.seed, hooks=hooks)
        if interrupted(summary):
            return {"stage": "unet", **summary}
        load_final_weights(sd, str(unet_dir / "checkpoints"), ema=ctx.config.train.ema)
        dtype = torch.float16 if c.save_dtype == "float16" else torch.float32
        out = _resolve(ctx, c.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(out), format="single-file", dtype=dtype)  # + the .yaml beside it
        written = {"model": str(out), "config": str(out.with_suffix(".yaml"))}
        # a stage finished in an earlier run trains no step now and so reports no loss
        losses = {"autoencoder_loss": ae_summary["loss"], "loss": summary["loss"]}
        return {**written, "scaling_factor": scale,
                **{k: (v if math.isfinite(v) else "(stage finished in an earlier run)") for k, v in losses.items()}}

