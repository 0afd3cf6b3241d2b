"""``controlnet-train``: train a ControlNet for the job's Stable Diffusion model with the core
Fabric loop (:func:`t2i_engine.training.loop.fit`: checkpoints, exact resume, EMA, logging), then
export it.

::

    [task]
    name = "controlnet-train"
    export = "controlnet"            # a diffusers ControlNetModel folder (or export_format = "v1.1")
    empty_prompt_ratio = 0.5         # the paper's 50 % of empty prompts
    [data]
    type = "controlnet-pairs"        # or controlnet-shapes, or webdataset with paired_keys
    root = "fill50k"
    [train]                          # the core loop's keys; lr defaults to 1e-5 here

The ControlNet starts as a copy of the UNet's encoder with zero convolutions (or from
``controlnet``, a checkpoint to continue from).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch
from attrs.validators import ge, le
from torch import Tensor
from torch.utils.data import Dataset

from t2i_engine.config.fields import HELP_META, PATH_META, existing_path, option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext

__all__ = ["ControlNetTrainConfig", "ControlNetTrainTask", "LatentPairs", "encode_once"]


def _widths(_inst: Any, attribute: attrs.Attribute, value: list[int]) -> None:
    if not value or any(int(w) < 1 for w in value):
        raise ValueError(f"{attribute.name} must be one or more positive widths, got {value!r}")


@attrs.frozen
class ControlNetTrainConfig:
    """``[task] name = "controlnet-train"`` (the loop itself is configured by ``[train]``)."""

    controlnet: str | None = existing_path(default=None, help="start from this ControlNet (a diffusers folder or "
                                           "an lllyasviel file); default: a copy of the UNet's encoder")
    hint_channels: int = option(default=3, validator=ge(1), help="channels of the hint (a fresh ControlNet)")
    hint_widths: list[int] = option(factory=lambda: [16, 32, 96, 256], validator=_widths,
                                    help="hint encoder widths of a fresh ControlNet; one stride-2 level per "
                                    "factor 2 of the autoencoder")
    sd_locked: bool = option(default=True, help="freeze the whole UNet (false: its decoder half trains too)")
    only_mid_control: bool = option(default=False, help="add only the middle residual (the original's "
                                    "only_mid_control); sampling must then set it too")
    empty_prompt_ratio: float = option(default=0.5, validator=[ge(0.0), le(1.0)],
                                       help="fraction of samples whose prompt is replaced by '' (paper: 0.5)")
    hint_key: str = option(default="hint", help="the batch field holding the hint image")
    sample_hints: list[str] = attrs.field(factory=list, metadata={
        PATH_META: "file", HELP_META: "hint images of the sample grids ([train] sample_every), one per "
        "[train] sample_prompts entry"})
    precache_latents: int = option(default=0, validator=ge(0), help="encode the first N samples once (autoencoder "
                                   "posterior means) and train on those; 0: encode every batch")
    export: str | None = option(default=None, help="write the trained ControlNet here (relative: inside "
                                "engine.output_dir)")
    export_format: Literal["diffusers", "v1.1"] = option(default="diffusers", help="diffusers folder or "
                                                         "lllyasviel v1.1 single file (control_model.*)")
    export_dtype: Literal["float32", "float16"] = option(default="float32", help="dtype of the exported weights")
    export_model: str | None = option(default=None, help="also write the SD model here (needed when "
                                      "sd_locked = false: its UNet decoder changed)")


class LatentPairs(Dataset):
    """Precomputed scaled latents with their captions and hints (what :func:`encode_once` makes)."""

    def __init__(self, latents: Tensor, hints: Tensor, captions: list[str], *, hint_key: str) -> None:
        self.latents, self.hints, self.captions, self.hint_key = latents, hints, captions, hint_key

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latents": self.latents[index], self.hint_key: self.hints[index], "caption": self.captions[index]}


@torch.no_grad()
def encode_once(vae: Any, dataset: Any, *, count: int, hint_key: str, batch_size: int = 64) -> LatentPairs:
    """The first ``count`` samples of a map-style paired ``dataset`` with their images encoded once
    (posterior means times the latent scale, as the SD plugin's ``shapes-train`` does)."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ConfigError("task.precache_latents: needs a map-style dataset (not a webdataset stream)")
    count = min(count, len(dataset))
    device = next(vae.parameters()).device
    latents, hints, captions = [], [], []
    for start in range(0, count, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        images = torch.stack([s["image"] for s in samples]).to(device)  # (B, 3, H, W)
        latents.append(vae.moments(images)[0].cpu() * vae.scaling_factor)  # (B, C, h, w)
        hints.append(torch.stack([s[hint_key] for s in samples]))
        captions += [s["caption"] for s in samples]
    return LatentPairs(torch.cat(latents), torch.cat(hints), captions, hint_key=hint_key)


class ControlNetTrainTask:
    """Train a ControlNet on paired data; export the (EMA) weights."""

    Config = ControlNetTrainConfig
    train_defaults = {"lr": 1e-5}  # the paper's learning rate, unless [train] sets lr

    def __init__(self, config: ControlNetTrainConfig) -> None:
        self.config = config

    def _check(self, ctx: RunContext) -> Any:
        from t2i_engine.training.config import TrainConfig

        c = self.config
        if ctx.config.data is None:
            raise ConfigError("data: task 'controlnet-train' needs a [data] table of hint/image pairs "
                              "(type = \"controlnet-pairs\", \"controlnet-shapes\" or a webdataset with paired_keys)")
        train = ctx.config.train or TrainConfig(**self.train_defaults)
        if train.sample_every:
            if not train.sample_prompts or len(c.sample_hints) != len(train.sample_prompts):
                raise ConfigError(f"task.sample_hints: the sample grids (train.sample_every) draw each of "
                                  f"train.sample_prompts with its hint: give one hint image per prompt (got "
                                  f"{len(c.sample_hints)} hints for {len(train.sample_prompts)} prompts)")
        elif c.sample_hints:
            raise ConfigError("task.sample_hints: no sample grids are drawn without train.sample_every (steps between "
                              "grids) and train.sample_prompts")
        if train.strategy == "fsdp" and c.export:
            raise ConfigError("task.export: not supported with train.strategy = 'fsdp'")
        if not c.sd_locked and c.export and not c.export_model:
            raise ConfigError("task.export_model: sd_locked = false trains the UNet's decoder too; give "
                              "export_model so the changed model is written beside the ControlNet")
        return train

    def _controlnet(self, ctx: RunContext, model: Any) -> Any:
        from t2i_plugin_controlnet.conditioner import ControlNetConditioner, ControlNetConditionerConfig
        from t2i_plugin_controlnet.formats import LoadedControlNet, load_controlnet
        from t2i_plugin_controlnet.network import controlnet_from_unet

        c = self.config
        if c.controlnet:
            loaded = load_controlnet(c.controlnet, base=model.denoiser)
        else:
            torch.manual_seed(ctx.seed)  # the hint encoder's random layers
            loaded = LoadedControlNet(controlnet_from_unet(model.denoiser, hint_channels=c.hint_channels,
                                                           hint_widths=tuple(c.hint_widths)), source="the UNet")
        config = ControlNetConditionerConfig(checkpoint=c.controlnet or "(a copy of the UNet's encoder)",
                                             only_mid_control=c.only_mid_control)
        conditioner = ControlNetConditioner(config, loaded=loaded, trainable=True, batch_key=c.hint_key)
        try:
            conditioner.setup(model)
        except ConfigError as exc:
            raise ConfigError(f"task: {exc}") from exc
        return conditioner, loaded

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.conditioning.chain import ConditionerChain, Entry
        from t2i_engine.tasks.common import build_model, output_path
        from t2i_engine.training.loop import fit, interrupted
        from t2i_plugin_controlnet.export import save_controlnet
        from t2i_plugin_controlnet.training import ControlNetTrainable

        c = self.config
        train = self._check(ctx)
        model = build_model(ctx, task="controlnet-train")
        conditioner, loaded = self._controlnet(ctx, model)
        chain = ConditionerChain([Entry(conditioner, label="controlnet-train")]).to(ctx.device)
        trainable = ControlNetTrainable(model, chain, empty_prompt_ratio=c.empty_prompt_ratio,  # type: ignore[arg-type]
                                        sd_locked=c.sd_locked, sample_hints=c.sample_hints)
        dataset = ctx.plugins.build(ctx.config.data)
        if c.precache_latents:
            dataset = encode_once(model.autoencoder, dataset, count=c.precache_latents, hint_key=c.hint_key)
        summary = fit(trainable, dataset, train, output_dir=ctx.output_dir, seed=ctx.seed,
                      hooks=ctx.plugins.hook, copy_ema=True)
        if interrupted(summary):
            return summary
        dtype = torch.float16 if c.export_dtype == "float16" else None
        if c.export:
            url = output_path(ctx, c.export)
            save_controlnet(attrs.evolve(loaded, net=conditioner.net), url, format=c.export_format, dtype=dtype)
            summary = {**summary, "exported": url}
        if c.export_model:
            url = output_path(ctx, c.export_model)
            model.save(url, dtype=dtype)
            summary = {**summary, "exported_model": url}
        return summary
