"""``precache``: run the model's autoencoder and text encoder once over ``[data]``.

Writes latent and text-embedding shards (:func:`t2i_engine.data.precache.precache`) that a
``train`` run reads back with ``[data] type = "precached"``, skipping both encoders every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from t2i_engine.config.fields import option
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_engine.tasks.common import build_model, inference_precision, output_path

__all__ = ["PrecacheConfig", "PrecacheTask"]


@attrs.frozen
class PrecacheConfig:
    """``[task] name = "precache"``."""

    out: str = option(default="precached", help="folder or fsspec URL of the shards (relative: inside "
                      "engine.output_dir); train with [data] type = \"precached\", url = this")
    batch_size: int = option(default=16, validator=attrs.validators.ge(1), help="samples per encoder call")
    shard_size: int = option(default=1024, validator=attrs.validators.ge(1), help="samples per shard file")
    sample_posterior: bool = option(default=False, help="store one posterior sample (seeded by engine.seed) "
                                    "instead of the posterior mean")


class PrecacheTask:
    """Encode every sample of ``[data]`` once and write the shards."""

    Config = PrecacheConfig

    def __init__(self, config: PrecacheConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        from t2i_engine.data.precache import precache

        c = self.config
        if ctx.config.data is None:
            raise ConfigError("data: task 'precache' needs a [data] table (the images and captions to encode)")
        model = build_model(ctx, task="precache").eval()
        autocast, dtype = inference_precision(ctx, model)  # engine.precision, as every inference task
        dataset = ctx.plugins.build(ctx.config.data)
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed) if c.sample_posterior else None
        url = output_path(ctx, c.out)

        @torch.no_grad()
        def encode_images(x: torch.Tensor) -> torch.Tensor:
            with autocast:
                return model.autoencoder.encode(x.to(dtype), generator=gen).float()  # shards stay float32

        @torch.no_grad()
        def encode_text(prompts: list[str]) -> Any:
            from t2i_engine.interfaces import TextEmbedding

            with autocast:
                emb = model.text_encoder.encode(prompts)
            return TextEmbedding(emb.tokens.float(), emb.mask,
                                 None if emb.pooled is None else emb.pooled.float())

        index = precache(dataset, encode_images=encode_images, encode_text=encode_text, out_url=url,
                         shard_size=c.shard_size, batch_size=c.batch_size, device=ctx.device)
        return {"precached": url, "count": index["count"], "shards": len(index["shards"])}
