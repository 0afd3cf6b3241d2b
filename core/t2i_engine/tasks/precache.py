"""``precache``: run the model's autoencoder and text encoder once over ``[data]``.

Writes latent and text-embedding shards (:func:`t2i_engine.data.precache.precache`) that a
``train`` run reads back with ``[data] type = "precached"``, skipping both encoders every step.
The dataset's further fields (hints, source images) are stored too, and each ``[[conditioners]]``
entry with a ``precache(batch)`` method adds what it computes once from them (with the model's
frozen parts), so a conditioned training run can read them back.
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
    applies_conditioners = True  # their precache() fields are stored in the shards

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

        encode_extras = _conditioner_fields(ctx, model, autocast)
        index = precache(dataset, encode_images=encode_images, encode_text=encode_text, out_url=url,
                         shard_size=c.shard_size, batch_size=c.batch_size, device=ctx.device,
                         encode_extras=encode_extras)
        return {"precached": url, "count": index["count"], "shards": len(index["shards"])}


def _conditioner_fields(ctx: RunContext, model: Any, autocast: Any) -> Any:
    """``batch -> fields``: every ``[[conditioners]]`` entry's ``precache(batch)`` output, in
    declared order (None when no entry has one). A field a second entry also computes is an error."""
    from t2i_engine.conditioning.build import build_conditioners

    chain = build_conditioners(ctx, model)
    steps = [(e.label, e.conditioner.precache) for e in (chain.entries if chain is not None else ())
             if callable(getattr(e.conditioner, "precache", None))]
    if not steps:
        return None

    @torch.no_grad()
    def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        fields: dict[str, torch.Tensor] = {}
        for label, fn in steps:
            with autocast:
                out = dict(fn(batch))
            clash = sorted(set(out) & (set(fields) | set(batch)))
            if clash:
                raise ConfigError(f"{label}: precache() returned the field {clash[0]!r}, which the dataset or an "
                                  "earlier conditioner already gives")
            fields |= {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
        return fields

    return encode
