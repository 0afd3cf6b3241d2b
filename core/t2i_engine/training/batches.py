"""Resumable, rank-aware batch streams for the training loop.

The data position saved in a checkpoint is one number: how many micro-batches this rank has
consumed. Map-style datasets are read through :class:`ResumableBatchSampler`, whose order is a
pure function of ``(seed, epoch)``, so resuming jumps straight to the right batch. Iterable
datasets (WebDataset) are re-iterated and the consumed batches skipped; they shard themselves by
rank and worker.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from t2i_engine.data.bad_samples import EVENTS_KEY

__all__ = ["ResumableBatchSampler", "batch_stream"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Infinite batches of indices: each epoch a fresh permutation (seeded by ``seed + epoch``),
    cut into global batches of ``batch_size * world_size``, of which rank ``r`` takes every
    ``world_size``-th index starting at ``r``. The incomplete tail of an epoch is dropped.

    With ``world_size=W, batch_size=b`` the union over ranks of batch ``k`` is exactly batch
    ``k`` of a single process with ``batch_size=W*b``; this is what makes DDP runs match.
    """

    def __init__(self, num_samples: int, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_batch: int = 0, shuffle: bool = True) -> None:
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(f"dataset of {num_samples} samples is smaller than one global batch "
                             f"({batch_size} x {world_size} devices)")
        self.n, self.b, self.rank, self.world = num_samples, batch_size, rank, world_size
        self.seed, self.start, self.shuffle = seed, start_batch, shuffle
        self.per_epoch = num_samples // global_batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, k = divmod(self.start, self.per_epoch)
        gb = self.b * self.world
        while True:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                perm = torch.randperm(self.n, generator=g).tolist()
            else:
                perm = list(range(self.n))
            for j in range(k, self.per_epoch):
                yield perm[j * gb:(j + 1) * gb][self.rank::self.world]
            epoch, k = epoch + 1, 0

    def __len__(self) -> int:  # DataLoader asks; the stream is effectively unbounded
        return 2**62


class _WithEvents(NamedTuple):
    """A collated batch and the decode events its samples carried from a worker."""

    batch: Any
    events: list[Any]


class _CollateKeepingEvents:
    """Collate samples without :data:`EVENTS_KEY`, keeping the events beside the batch (runs in
    the workers, so it must pickle: a class, not a closure)."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: list[Any]) -> _WithEvents:
        events = []
        for s in samples:
            if isinstance(s, dict) and EVENTS_KEY in s:
                events += s[EVENTS_KEY]
        clean = [{k: v for k, v in s.items() if k != EVENTS_KEY} if isinstance(s, dict) else s for s in samples]
        return _WithEvents(self.collate(clean), events)


def _counted(batches: Iterator[_WithEvents], dataset: Any) -> Iterator[Any]:
    """Hand each batch's worker events to the dataset's tally (in batch order), then yield it."""
    tally = getattr(dataset, "bad_samples", None)
    for item in batches:
        if item.events and tally is not None:
            tally.record_all(item.events)
        yield item.batch


def batch_stream(dataset: Dataset | IterableDataset, *, batch_size: int, rank: int,
                 world_size: int, seed: int, start_batch: int, num_workers: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 pin_memory: bool = False) -> Iterator[Any]:
    """An endless iterator of collated micro-batches for this rank, starting at ``start_batch``.

    Corrupt samples that DataLoader workers skipped are counted in ``dataset.bad_samples`` of
    this process as their batches arrive (see :mod:`t2i_engine.data.bad_samples`)."""
    yield from _stream(dataset, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                       start_batch=start_batch, num_workers=num_workers,
                       collate=_CollateKeepingEvents(collate_fn or default_collate), pin_memory=pin_memory)


def _stream(dataset: Dataset | IterableDataset, *, batch_size: int, rank: int, world_size: int, seed: int,
            start_batch: int, num_workers: int, collate: Callable[[list[Any]], Any],
            pin_memory: bool) -> Iterator[Any]:
    if not isinstance(dataset, IterableDataset):
        sampler = ResumableBatchSampler(len(dataset), batch_size=batch_size, rank=rank,  # type: ignore[arg-type]
                                        world_size=world_size, seed=seed, start_batch=start_batch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                            collate_fn=collate, pin_memory=pin_memory,
                            persistent_workers=num_workers > 0)
        yield from _counted(iter(loader), dataset)
        return

    def epochs() -> Iterator[Any]:
        for epoch in itertools.count():
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                collate_fn=collate, pin_memory=pin_memory, drop_last=True)
            empty = True
            for batch in _counted(iter(loader), dataset):  # skipped batches are counted too
                empty = False
                yield batch
            if empty:
                from t2i_engine.errors import DataError

                raise DataError(f"{type(dataset).__name__} yielded no complete batch of {batch_size}")

    yield from itertools.islice(epochs(), start_batch, None)
