"""WebDataset tar shards over fsspec (file://, memory://, s3://, gs:// ...).

Shards are listed with brace expansion (``shard-{000..099}.tar``), shuffled per epoch from the
seed (or, with ``resample``, drawn with replacement forever), split by rank and then by
DataLoader worker, opened through fsspec and unpacked with the webdataset library's tar
iterators. Samples are grouped by key; the image is the first present of ``image_keys``, the
caption the first of ``caption_keys``. Undecodable samples are skipped, counted and logged.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from typing import Any

import attrs
import fsspec
import torch
from attrs.validators import ge
from torch.utils.data import IterableDataset, get_worker_info

from t2i_engine.config.fields import option
from t2i_engine.data.bad_samples import BadSamples
from t2i_engine.data.common import TransformOptions, decode_image, sample_generator
from t2i_engine.errors import DataError

__all__ = ["WebDatasetShards"]


@attrs.frozen(kw_only=True)
class WebDatasetConfig(TransformOptions):
    """Keys of ``[data]`` with ``type = "webdataset"``."""

    urls: list[str] = option(help="shard URLs; each may use brace expansion {000..099}")
    image_keys: list[str] = option(factory=lambda: ["jpg", "jpeg", "png", "webp"],
                                   help="extensions tried for the image, in order")
    caption_keys: list[str] = option(factory=lambda: ["txt", "caption"],
                                     help="extensions tried for the caption, in order")
    paired_keys: list[str] = option(factory=list,
                                    help="extensions of paired images (hint, edit), same crop")
    shuffle_shards: bool = option(default=True, help="shuffle the shard order every epoch")
    resample: bool = option(default=False, help="draw shards with replacement, endlessly")
    shuffle_buffer: int = option(default=0, validator=ge(0), help="sample shuffle buffer (0: off)")


def _seed(*parts: Any) -> int:
    """A seed from ``parts`` that is the same in every process (unlike ``hash``)."""
    return zlib.crc32(repr(parts).encode())


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WebDatasetShards(IterableDataset):
    """Iterable dataset of ``{"image", "caption", "key", <paired keys>}`` samples."""

    Config = WebDatasetConfig

    def __init__(self, config: WebDatasetConfig) -> None:
        from webdataset.shardlists import expand_urls

        self.config = config
        self.shards = [u for url in config.urls for u in expand_urls(url)]
        if not self.shards:
            raise DataError("webdataset: no shard URLs")
        self.transform = config.transform()
        self.bad_samples = BadSamples()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop before each pass: reshuffles the shards."""
        self.epoch = epoch

    def shards_for(self, rank: int, world: int, worker: int, workers: int) -> Iterator[str]:
        """The shard URLs this rank and worker read this epoch, in order."""
        if self.config.resample:
            rng = random.Random(_seed(self.config.seed, self.epoch, rank, worker))
            while True:
                yield rng.choice(self.shards)
        order = list(self.shards)
        if self.config.shuffle_shards:
            random.Random(self.config.seed * 7919 + self.epoch).shuffle(order)
        yield from order[rank::world][worker::workers]

    def _samples(self, url: str) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        with fsspec.open(url, "rb") as stream:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            yield from group_by_keys(files)

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        def first(keys: list[str], what: str) -> bytes:
            for k in keys:
                if k in raw:
                    return raw[k]
            raise KeyError(f"no {what} (looked for {', '.join(keys)}; has {', '.join(sorted(raw))})")

        key = f"{raw.get('__url__', '')}#{raw['__key__']}"
        images = {"image": decode_image(first(self.config.image_keys, "image"))}
        for k in self.config.paired_keys:
            images[k] = decode_image(first([k], k))
        caption = first(self.config.caption_keys, "caption").decode("utf-8").strip()
        out: dict[str, Any] = self.transform(images, generator=sample_generator(self.config.seed, key))
        return {**out, "caption": caption, "key": key}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        buffer: list[dict[str, Any]] = []
        rng = random.Random(_seed(self.config.seed, self.epoch, rank, worker, "buffer"))
        for url in self.shards_for(rank, world, worker, workers):
            for raw in self._samples(url):
                raw.setdefault("__url__", url)
                try:
                    sample = self._decode(raw)
                except Exception as e:
                    self.bad_samples.failed(f"{url}#{raw.get('__key__')}", e)
                    continue
                self.bad_samples.ok(sample["key"])
                sample = self.bad_samples.attach(sample)
                if not self.config.shuffle_buffer:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= self.config.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer
