"""``edit-train``: train (or fine-tune) an InstructPix2Pix model with the core Fabric loop.

The ``[model]`` may be any Stable Diffusion checkpoint: a 4-channel UNet is grown to 8 channels
first (:func:`~t2i_plugin_instructpix2pix.init.grow_to_edit_model`: new channels zero, bias kept,
as the reference ``init_from_ckpt``); an 8-channel one (an InstructPix2Pix checkpoint) is trained
on; SD inpainting's 9 channels are refused. ``[data]`` is an edit-triplet dataset (``ip2p-folder``,
``ip2p-webdataset``, ``shapes-edit``); ``[train]`` configures the loop (resume, checkpoints, EMA,
logging). With ``train.ema`` on, the EMA weights are what ``export`` writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch
from torch import Tensor
from torch.utils.data import Dataset

from t2i_engine.config.fields import option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext

__all__ = ["CachedEditLatents", "cached_latents_file", "EditTrainConfig", "EditTrainTask", "cache_edit_latents", "edit_model_for_training"]


def _dropout_value(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0 / 3.0:
        raise ValueError(f"{attribute.name} must be in [0, 1/3] (three disjoint cases of this probability), got {value}")


@attrs.frozen
class EditTrainConfig:
    """``[task] name = "edit-train"`` (the loop itself is configured by ``[train]``)."""

    conditioning_dropout: float = option(
        default=0.05, validator=_dropout_value,
        help="p of the reference's dropout: text only dropped with p, both with p, source image only with p")
    train_text_encoder: bool = option(default=False, help="also train the text encoder (the reference freezes it)")
    ema: bool = option(default=True, help="a checkpoint with model_ema.* keys: start from its EMA weights "
                                          "(false: from its trained ones)")
    cache_latents: int = option(default=0, validator=attrs.validators.ge(0),
                                help="encode the first N samples of a map-style dataset once (kept in "
                                     "output_dir/edit-latents.safetensors for resumed runs) and train on them "
                                     "(targets: posterior mean, scaled); 0: encode every batch")
    export: str | None = option(default=None, help="after training write the model here (relative: inside "
                                                   "engine.output_dir)")
    export_format: Literal["diffusers", "single-file"] | None = option(
        default=None, help="format of the export (default diffusers)")
    export_dtype: Literal["float32", "float16"] = option(default="float32", help="dtype of the exported floats")


class CachedEditLatents(Dataset):
    """Precomputed ``latents`` (target, scaled), ``source_latents`` (unscaled mode) and captions."""

    def __init__(self, latents: Tensor, sources: Tensor, captions: list[str]) -> None:
        self.latents, self.sources, self.captions = latents, sources, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latents": self.latents[index], "source_latents": self.sources[index], "caption": self.captions[index]}


@torch.no_grad()
def cache_edit_latents(vae: Any, dataset: Any, *, count: int, batch_size: int = 64) -> CachedEditLatents:
    """Encode the first ``count`` samples of ``dataset`` (``source``, ``image``, ``caption``):
    targets as the posterior mean times the scaling factor, sources as the unscaled mode."""
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ConfigError("task.cache_latents: needs a map-style [data] dataset (not WebDataset shards)")
    count = min(count, len(dataset))
    device = next(vae.parameters()).device
    targets, sources, captions = [], [], []
    for start in range(0, count, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        both = torch.stack([s["image"] for s in samples] + [s["source"] for s in samples]).to(device)
        mean = vae.moments(both)[0].cpu()  # (2B, C, h, w); mode = mean for the diagonal Gaussian
        targets.append(mean[: len(samples)] * vae.scaling_factor)
        sources.append(mean[len(samples):])
        captions += [s["caption"] for s in samples]
    return CachedEditLatents(torch.cat(targets), torch.cat(sources), captions)


def _fingerprint(vae: Any, data_config: Any, count: int) -> str:
    """What the cached latents depend on: the autoencoder's weights, the [data] table and the count."""
    import hashlib

    h = hashlib.sha256(f"{data_config!r}|{count}|{vae.scaling_factor!r}".encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def cached_latents_file(vae: Any, dataset: Any, *, count: int, data_config: Any, url: str) -> CachedEditLatents:
    """:func:`cache_edit_latents`, kept in the safetensors file ``url``: read back when it was
    written for the same autoencoder weights, ``[data]`` table and count (a resumed run does not
    encode again), else encoded and written."""
    import json

    from t2i_engine.checkpoint.io import load_safetensors, save_safetensors

    key = _fingerprint(vae, data_config, count)
    try:
        t = load_safetensors(url)
        if bytes(t["fingerprint"].tolist()).decode() == key:
            return CachedEditLatents(t["latents"], t["source_latents"],
                                     json.loads(bytes(t["captions"].tolist()).decode()))
    except Exception:  # noqa: BLE001 - no file, another layout, a torn write: encode again
        pass
    cache = cache_edit_latents(vae, dataset, count=count)
    save_safetensors({"latents": cache.latents, "source_latents": cache.sources,
                      "captions": torch.tensor(list(json.dumps(cache.captions).encode()), dtype=torch.uint8),
                      "fingerprint": torch.tensor(list(key.encode()), dtype=torch.uint8)}, url)
    return cache


def edit_model_for_training(model: Any, *, ema: bool) -> Any:
    """``model`` (an SD bundle) settled to its EMA or trained weights and, when its UNet has 4
    input channels, grown to 8; a ConfigError for other widths (SD inpainting's 9 named)."""
    from t2i_plugin_instructpix2pix.edit import EDIT_CHANNELS, check_edit_model
    from t2i_plugin_instructpix2pix.ema import choose_weights
    from t2i_plugin_instructpix2pix.init import grow_to_edit_model

    choose_weights(model, ema=ema)
    if model.denoiser.config.in_channels * 2 == EDIT_CHANNELS:
        model = grow_to_edit_model(model)
    try:
        check_edit_model(model)
    except ValueError as exc:
        raise ConfigError(f"model.checkpoint: {exc}") from exc
    return model


class EditTrainTask:
    """Grow (when needed), train, checkpoint, and optionally export the (EMA) weights."""

    Config = EditTrainConfig

    def __init__(self, config: EditTrainConfig) -> None:
        self.config = config

    def _check(self, ctx: RunContext) -> Any:
        from t2i_engine.training.config import TrainConfig

        if ctx.config.data is None:
            raise ConfigError("data: task 'edit-train' needs a [data] table of edit triplets (type = \"ip2p-folder\", "
                              "\"ip2p-webdataset\" or \"shapes-edit\")")
        train = ctx.config.train or TrainConfig()
        if train.sample_every or train.sample_prompts:
            raise ConfigError("train.sample_every: task 'edit-train' draws no sample grids (an edit needs a source "
                              "image); leave sample_every and sample_prompts out")
        if self.config.export and train.strategy == "fsdp":
            raise ConfigError("task.export: not supported with train.strategy = 'fsdp' yet; export from a run with "
                              "strategy = 'ddp'")
        return train

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.tasks.common import build_model, output_path
        from t2i_engine.training.loop import fit, interrupted
        from t2i_plugin_instructpix2pix.ema import has_ema
        from t2i_plugin_instructpix2pix.formats import save_edit_model
        from t2i_plugin_instructpix2pix.trainable import EditTrainable

        c = self.config
        train = self._check(ctx)
        model = build_model(ctx, task="train")  # [[adapters]] are baked into the weights
        if c.ema and has_ema(model) and ctx.config.adapters:
            raise ConfigError("adapters: [[adapters]] on a checkpoint with EMA weights (model_ema.*) are not "
                              "supported yet; set [task] ema = false or use a file without model_ema.* keys")
        model = edit_model_for_training(model, ema=c.ema).to(ctx.device)
        trainable = EditTrainable(model, conditioning_dropout=c.conditioning_dropout,
                                  train_text_encoder=c.train_text_encoder)
        dataset = ctx.plugins.build(ctx.config.data)
        if c.cache_latents:
            dataset = cached_latents_file(model.vae, dataset, count=c.cache_latents, data_config=ctx.config.data,
                                          url=str(ctx.output_dir / "edit-latents.safetensors"))
        summary = fit(trainable, dataset, train, output_dir=ctx.output_dir, seed=ctx.seed,
                      hooks=ctx.plugins.hook, copy_ema=True)
        if interrupted(summary):
            return summary
        if c.export:
            url = output_path(ctx, c.export)
            dtype = torch.float16 if c.export_dtype == "float16" else None
            save_edit_model(model, url, format=c.export_format, dtype=dtype)
            summary = {**summary, "exported": url}
        return summary
