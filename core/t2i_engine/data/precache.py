"""Precaching: run the autoencoder and text encoder once, train on latents and embeddings.

:func:`precache` writes ``shard-00000.safetensors ...`` (tensors ``latents``, ``text_tokens``
and, when the encoder has them, ``text_mask`` and ``text_pooled``; captions in the metadata)
plus an ``index.json`` written last, all atomically; :class:`PrecachedDataset` (the
``"precached"`` dataset type) reads them back. A dataset's further tensor fields (a hint, a
source image) and what a conditioner's ``precache()`` computes from them are stored beside them
and come back under their own names. Models recognise precached batches by their ``"latents"`` key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from t2i_engine.checkpoint.io import atomic_write_bytes, read_bytes, save_safetensors
from t2i_engine.config.fields import existing_path
from t2i_engine.errors import DataError
from t2i_engine.interfaces import TextEmbedding

__all__ = ["RESERVED", "PrecachedDataset", "extra_fields", "precache"]

FORMAT = "t2i-engine-precached-1"


RESERVED = ("latents", "text_tokens", "text_mask", "text_pooled", "caption", "index")
"""Names a shard or a precached sample gives its own meaning to (not available to extra fields)."""


def extra_fields(sample: dict[str, Any]) -> list[str]:
    """A sample's tensor fields besides ``image`` and ``caption`` (a hint, a source image ...)."""
    return [k for k, v in sample.items() if k not in ("image", "caption") and isinstance(v, Tensor)]


def _checked(fields: dict[str, Tensor]) -> dict[str, Tensor]:
    clash = sorted(set(fields) & set(RESERVED))
    if clash:
        raise DataError(f"precache: the field name {clash[0]!r} is reserved in precached shards "
                        f"({', '.join(RESERVED)}); rename it in the dataset or conditioner")
    return fields


def _collate_keep_strings(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"image": default_collate([s["image"] for s in samples]),
           "caption": [str(s.get("caption", "")) for s in samples]}
    for k in extra_fields(samples[0]):
        out[k] = default_collate([s[k] for s in samples])
    return out


def _batches(dataset: Any, batch_size: int) -> Iterator[dict[str, Any]]:
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate_keep_strings)


@torch.no_grad()
def precache(dataset: Any, *, encode_images: Callable[[Tensor], Tensor],
             encode_text: Callable[[Sequence[str]], TextEmbedding], out_url: str,
             shard_size: int = 1024, batch_size: int = 16,
             device: torch.device | str = "cpu",
             encode_extras: Callable[[dict[str, Any]], dict[str, Tensor]] | None = None) -> dict[str, Any]:
    """Encode every sample of ``dataset`` once and write latent/embedding shards to ``out_url``.

    Args:
        dataset: yields ``{"image": (3, H, W) in [-1, 1], "caption": str}`` samples; further
            tensor fields (a ControlNet hint, an edit's source image ...) are stored as they are
            and come back under their own names.
        encode_images: images ``(B, 3, H, W)`` -> scaled latents ``(B, C, h, w)`` (e.g.
            ``autoencoder.encode``; pass a closure with a generator to sample the posterior).
        encode_text: prompts -> :class:`~t2i_engine.interfaces.TextEmbedding`.
        out_url: folder path or fsspec URL of the shards.
        shard_size: samples per shard.
        batch_size: samples per encoder call.
        device: where the images are sent before encoding.
        encode_extras: the collated batch (on ``device``) -> further fields to store (a
            conditioner's :meth:`precache`, e.g. a source image through the frozen autoencoder).

    Returns:
        the index written to ``<out_url>/index.json``.
    """
    shards: list[dict[str, Any]] = []
    pending: dict[str, Tensor] = {}  # encoded samples not yet written, batch-first
    captions: list[str] = []

    def write(n: int) -> None:
        """Write the first ``n`` pending samples as the next shard."""
        name = f"shard-{len(shards):05d}.safetensors"
        save_safetensors({k: v[:n] for k, v in pending.items()}, f"{out_url.rstrip('/')}/{name}",
                         metadata={"format": FORMAT, "captions": json.dumps(captions[:n])})
        shards.append({"name": name, "count": n})
        for k in list(pending):
            pending[k] = pending[k][n:]
        del captions[:n]

    for batch in _batches(dataset, batch_size):
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        latents = encode_images(batch["image"])  # (B, C, h, w)
        emb = encode_text(list(batch["caption"]))
        extras = _checked({k: batch[k] for k in batch if k not in ("image", "caption")})
        extras |= _checked(dict(encode_extras(batch))) if encode_extras is not None else {}
        parts = {"latents": latents, "text_tokens": emb.tokens, "text_mask": emb.mask,
                 "text_pooled": emb.pooled, **extras}
        for k, v in parts.items():
            if v is not None:
                v = v.detach().cpu()
                pending[k] = torch.cat([pending[k], v]) if k in pending else v
        captions.extend(batch["caption"])
        while len(captions) >= shard_size:
            write(shard_size)
    if captions:
        write(len(captions))
    if not shards:
        raise DataError("precache: the dataset yielded no samples")
    index = {"format": FORMAT, "count": sum(s["count"] for s in shards), "shards": shards}
    atomic_write_bytes(f"{out_url.rstrip('/')}/index.json", json.dumps(index, indent=1).encode())
    return index


@attrs.frozen(kw_only=True)
class PrecachedConfig:
    """Keys of ``[data]`` with ``type = "precached"``."""

    url: str = existing_path(kind="dir", help="folder or fsspec URL written by the precache task")


class PrecachedDataset(Dataset):
    """Map-style dataset over :func:`precache` output: ``{"latents", "text_tokens",
    ["text_mask"], ["text_pooled"], "caption", "index"}`` per sample."""

    Config = PrecachedConfig

    def __init__(self, config: PrecachedConfig) -> None:
        self.url = config.url.rstrip("/")
        index = json.loads(read_bytes(f"{self.url}/index.json"))
        if index.get("format") != FORMAT:
            raise DataError(f"{self.url}/index.json is not a precache index ({index.get('format')!r})")
        self.shards = index["shards"]
        self.starts: list[int] = []
        total = 0
        for s in self.shards:
            self.starts.append(total)
            total += s["count"]
        self.count = total
        self._cache: tuple[int, dict[str, Tensor], list[str]] | None = None

    def __len__(self) -> int:
        return self.count

    def _shard(self, k: int) -> tuple[dict[str, Tensor], list[str]]:
        if self._cache is None or self._cache[0] != k:
            from safetensors.torch import load

            data = read_bytes(f"{self.url}/{self.shards[k]['name']}")
            tensors, captions = load(data), json.loads(_metadata(data)["captions"])
            self._cache = (k, tensors, captions)
        return self._cache[1], self._cache[2]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        import bisect

        k = bisect.bisect_right(self.starts, index) - 1
        tensors, captions = self._shard(k)
        i = index - self.starts[k]
        return {**{name: t[i] for name, t in tensors.items()}, "caption": captions[i], "index": index}


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})
