"""``dreambooth``: fine-tune any model bundle on a few subject images with prior preservation,
through the core Fabric loop (resume, checkpoints, logging), and write a LoRA and/or full weights.

The order of a run: build the model (``[model]``, ``[schedule]``, ``[[adapters]]`` baked in, as the
core ``train`` task does); read the instance images; with prior preservation, complete the class
images (your ``class_data`` first, then the model's own samples from the cache, sampling only the
missing ones with ``[sampler]`` and ``[guidance]``); wrap the model's ``trainable()`` in
:class:`~t2i_plugin_dreambooth.trainable.DreamBoothTrainable` (a fresh LoRA, or its own weights);
:func:`t2i_engine.training.loop.fit`; export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_engine.tasks.common import build_model, output_path
from t2i_plugin_dreambooth.config import DEFAULT_LORA_RANK, DEFAULT_LORA_TARGETS, DreamBoothConfig
from t2i_plugin_dreambooth.dataset import DreamBoothDataset, captioned
from t2i_plugin_dreambooth.folders import ImageEntry, read_image_folder

__all__ = ["DreamBoothTask"]

_LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets", "lora_text_targets", "lora_dropout", "export_lora",
              "lora_format", "lora_dtype", "token_embedding", "token_embedding_lr", "export_embedding")
_PRIOR_KEYS = ("class_prompt", "class_data")


class DreamBoothTask:
    """Teach a model a subject (``"a sks dog"``) from a few images; see the module docstring."""

    Config = DreamBoothConfig

    def __init__(self, config: DreamBoothConfig) -> None:
        self.config = config

    # --- checks before any work ---------------------------------------------------------------

    def _check(self, ctx: RunContext) -> None:
        c = self.config
        if ctx.config.data is not None:
            raise ConfigError("data: task 'dreambooth' reads its images from task.instance_data (and class_data); "
                              "remove the [data] table")
        if c.method == "full":
            given = [k for k in _LORA_KEYS if getattr(c, k) is not None]
            if given:
                raise ConfigError(f"task.{given[0]}: a LoRA setting, but method = \"full\" trains the weights; "
                                  "remove it or set method = \"lora\"")
            if c.export is None:
                raise ConfigError("task.export: method = \"full\" writes its result only through export (a path); "
                                  "set it")
        for key in ("export_embedding", "token_embedding_lr"):
            if getattr(c, key) is not None and c.token_embedding is None:
                raise ConfigError(f"task.{key}: set but there is no token_embedding; set token_embedding (the "
                                  "identifier word) or remove it")
        if c.lora_text_targets is not None and not c.train_text_encoder:
            raise ConfigError("task.lora_text_targets: set but train_text_encoder = false; turn it on or remove them")
        if not c.prior_preservation:
            given = [k for k in _PRIOR_KEYS if getattr(c, k) is not None]
            unused = [f"task.{k}" for k in given] + [f"[{t}]" for t in ("sampler", "guidance")
                                                      if getattr(ctx.config, t) is not None]
            if unused:
                raise ConfigError(f"{unused[0]}: only prior preservation uses it, and prior_preservation = false; "
                                  "remove it or turn prior preservation on")
        train = ctx.config.train
        if train is not None and train.strategy == "fsdp":
            raise ConfigError("train.strategy: 'fsdp' shards the weights; DreamBooth exports need them whole "
                              "(use 'ddp')")

    # --- class images -----------------------------------------------------------------------------

    def _class_images(self, ctx: RunContext, model: Any) -> tuple[list[ImageEntry], dict[str, Any]]:
        from t2i_plugin_dreambooth.folders import expand_repeats
        from t2i_plugin_dreambooth.prior import ClassImageSpec, ensure_class_images, model_fingerprint

        c = self.config
        single = c.class_prompt if isinstance(c.class_prompt, str) else None
        own = [] if c.class_data is None else captioned(
            read_image_folder(c.class_data, what="task.class_data"), single, what="task.class_data", key="class_prompt")
        missing = c.num_class_images - len(expand_repeats(own))
        if missing <= 0:
            return own, {"class_images_given": len(own), "class_images_sampled": 0, "class_images_reused": 0}
        if c.class_prompt is None:
            raise ConfigError(f"task.class_prompt: prior preservation needs {missing} more class images "
                              f"(num_class_images = {c.num_class_images}) and there is no prompt to sample them with")
        if ctx.config.sampler is None:
            raise ConfigError("sampler: prior preservation samples class images with the model; add a [sampler] "
                              "table (e.g. name = \"dpmpp_2m\", steps = 20)")
        prompts = (c.class_prompt,) if isinstance(c.class_prompt, str) else tuple(c.class_prompt)
        tables = {"model": ctx.config.model, "schedule": ctx.config.schedule}
        spec = ClassImageSpec(model=model_fingerprint(model, tables=tables),
                              sampler={"name": ctx.config.sampler.name, "options": ctx.config.sampler.options},
                              guidance=ctx.config.guidance, precision=ctx.config.engine.precision, size=c.resolution,
                              prompts=prompts, seed=ctx.seed)
        sampled, made = ensure_class_images(output_path(ctx, c.class_images_dir), spec, missing,
                                            generate=self._sampler(ctx, model), batch_size=c.sample_batch_size)
        return own + sampled, {"class_images_given": len(own), "class_images_sampled": made,
                               "class_images_reused": missing - made}

    def _sampler(self, ctx: RunContext, model: Any) -> Any:
        """``(prompts, seeds) -> images``: the run's sampler and guidance over the model, in eval mode
        (weights untouched; ``engine.precision`` other than 32 samples under autocast)."""
        from t2i_engine.tasks.grid import sample_batched

        sampler = ctx.plugins.build(ctx.config.sampler)  # type: ignore[arg-type]
        precision = ctx.config.engine.precision
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        autocast = contextlib.nullcontext() if precision.startswith("32") else torch.autocast(ctx.device.type, dtype=dtype)

        def generate(prompts: Any, seeds: Any) -> torch.Tensor:
            parts = [m for m in (model.text_encoder, model.autoencoder, model.denoiser) if isinstance(m, torch.nn.Module)]
            modes = [m.training for m in parts]
            for m in parts:
                m.eval()
            try:
                with torch.no_grad():
                    return sample_batched(model, list(prompts), list(seeds), sampler=sampler,
                                          guidance=ctx.config.guidance, size=self.config.resolution,
                                          batch_size=len(prompts), desc="class images",
                                          precision=(autocast, torch.float32))
            finally:
                for m, mode in zip(parts, modes):
                    m.train(mode)

        return generate

    # --- the run ------------------------------------------------------------------------------------

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.data.transforms import PairedTransform
        from t2i_engine.training.config import TrainConfig
        from t2i_engine.training.loop import fit, interrupted
        from t2i_plugin_dreambooth.trainable import DreamBoothTrainable

        c = self.config
        self._check(ctx)
        train = ctx.config.train or TrainConfig()
        instances = captioned(read_image_folder(c.instance_data, what="task.instance_data"), c.instance_prompt,
                              what="task.instance_data", key="instance_prompt")
        if c.token_embedding is not None:
            _check_identifier(c.token_embedding, instances)
        model = build_model(ctx, task="train")
        keymap = None
        if c.method == "lora":
            from t2i_plugin_dreambooth.lora import key_map_of

            keymap = key_map_of(model)  # before any work: a model that cannot save a LoRA fails now
        classes, counts = self._class_images(ctx, model) if c.prior_preservation else ([], {})
        adapter = self._adapter(model, keymap, train.lr) if keymap is not None else None
        # a token embedding trains through the text encoder: it runs with gradients (its own weights
        # stay frozen in a LoRA run: only the adapter's parameters train)
        inner = model.trainable(caption_dropout=0.0,
                                train_text_encoder=c.train_text_encoder or c.token_embedding is not None)
        trainable = DreamBoothTrainable(inner, prior_loss_weight=c.prior_loss_weight, adapter=adapter)
        dataset = DreamBoothDataset(instances, classes or None,
                                    transform=PairedTransform(resolution=c.resolution, crop=c.crop, hflip=c.hflip),
                                    seed=c.seed)
        summary: dict[str, Any] = {**fit(trainable, dataset, train, output_dir=ctx.output_dir, seed=ctx.seed,
                                         hooks=ctx.plugins.hook, copy_ema=True),
                                   "instance_images": len(instances), **counts}
        if interrupted(summary):  # neither the LoRA nor the export is written
            return summary
        if adapter is not None and keymap is not None:
            summary["lora"] = self._save_lora(ctx, adapter, keymap, train, len(instances), len(classes))
        if c.export:
            if adapter is not None:
                adapter.bake()  # the full export holds base + LoRA
            url = output_path(ctx, c.export)
            model.save(url, format=c.export_format)
            summary["exported"] = url
        return summary

    def _adapter(self, model: Any, keymap: Any, lr: float) -> Any:
        from t2i_plugin_dreambooth.lora import create_dreambooth_adapter, target_names

        c = self.config
        names = target_names(model, keymap, unet=c.lora_targets or list(DEFAULT_LORA_TARGETS),
                             text=c.lora_text_targets, train_text_encoder=c.train_text_encoder)
        return create_dreambooth_adapter(model, names, rank=c.lora_rank or DEFAULT_LORA_RANK, alpha=c.lora_alpha,
                                         dropout=c.lora_dropout or 0.0, token_embedding=c.token_embedding,
                                         token_lr_scale=(c.token_embedding_lr or lr) / lr)

    def _save_lora(self, ctx: RunContext, adapter: Any, keymap: Any, train: Any, n_instance: int, n_class: int) -> str:
        from t2i_plugin_dreambooth.lora import save_lora

        c = self.config
        meta = {"ss_training_comment": "t2i-engine dreambooth", "ss_num_train_images": str(n_instance),
                "ss_num_reg_images": str(n_class), "ss_max_train_steps": str(train.max_steps),
                "ss_learning_rate": str(train.lr), "ss_prior_loss_weight": str(c.prior_loss_weight),
                "ss_resolution": f"({c.resolution}, {c.resolution})", "ss_seed": str(ctx.seed)}
        url = save_lora(adapter, output_path(ctx, c.export_lora or "lora.safetensors"), keymap,
                        format=c.lora_format or "kohya", dtype=c.lora_dtype or "float32", metadata=meta)
        if adapter.embeddings is not None:
            from t2i_engine.adapters import save_textual_inversion
            from t2i_plugin_dreambooth.lora import DTYPES

            save_textual_inversion(adapter.embeddings, output_path(ctx, c.export_embedding or "embedding.safetensors"),
                                   dtype=DTYPES[c.lora_dtype or "float32"])
        return url


def _check_identifier(word: str, instances: list[ImageEntry]) -> None:
    """``token_embedding`` must be a word of some instance caption: else its embedding never trains."""
    import re

    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    if not any(pattern.search(e.caption or "") for e in instances):
        raise ConfigError(f"task.token_embedding: {word!r} is in no instance caption (e.g. "
                          f"{instances[0].caption!r}), so its embedding would never train")
