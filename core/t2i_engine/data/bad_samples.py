"""Counting corrupt samples: each is skipped, counted once, and logged; too many stop the run.

One tally per dataset, kept in the process that consumes the batches. A DataLoader worker does
not count: it attaches what it saw (``(key, error or None)`` events) to the sample it returns,
under :data:`EVENTS_KEY`; :func:`t2i_engine.training.batches.batch_stream` carries them through
collation and hands them to the dataset's tally in the main process, in batch order. So the
counts and the moment the limit trips are the same with 0, 1 or 8 workers.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from typing import Any

from torch.utils.data import get_worker_info

from t2i_engine.errors import DataError

__all__ = ["EVENTS_KEY", "BadSamples"]

log = logging.getLogger("t2i_engine.data")

EVENTS_KEY = "_t2i_sample_events"
"""Sample-dict key under which a DataLoader worker passes its decode events to the main process."""

Event = tuple[str, "str | None"]


def _key_id(key: str) -> int:
    """A compact id per sample key (a set of ints stays small for millions of samples)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class BadSamples:
    """Tally of distinct samples read and distinct samples that failed to decode.

    Each sample (by key: a path, a shard URL and member) counts once however often it is read,
    and a bad one served by a neighbour is not counted again. Once at least ``min_seen``
    samples were read, a failure fraction above ``max_fraction`` raises :class:`DataError`
    naming the first bad samples. The training loop sets ``max_fraction`` from
    ``train.max_bad_sample_fraction``.
    """

    def __init__(self, *, max_fraction: float = 0.01, min_seen: int = 32, keep: int = 10) -> None:
        self.max_fraction = max_fraction
        self.min_seen = min_seen
        self.keep = keep
        self.first_bad: list[str] = []  # "key (error)" of the first ``keep`` bad samples
        self.first_bad_keys: list[str] = []
        self._seen: set[int] = set()
        self._bad: set[int] = set()
        self._pending: list[Event] = []  # in a worker: events not yet handed to a sample

    @property
    def seen(self) -> int:
        """Distinct samples read so far (good or bad)."""
        return len(self._seen)

    @property
    def bad(self) -> int:
        """Distinct samples that failed to decode so far."""
        return len(self._bad)

    def ok(self, key: str) -> None:
        """Count a sample that decoded (and raise if earlier failures are now over the limit)."""
        self.record(key, None)

    def failed(self, key: str, error: BaseException) -> None:
        """Count, log and remember a sample that did not decode; raise when over the limit."""
        message = re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error))  # PIL names its BytesIO object
        self.record(key, f"{type(error).__name__}: {message}")

    def record(self, key: str, error: str | None) -> None:
        """Count one read of ``key`` (``error``: why it failed, None when it decoded).

        In a DataLoader worker the event is kept for :meth:`attach` instead.
        """
        if get_worker_info() is not None:
            self._pending.append((key, error))
            return
        kid = _key_id(key)
        self._seen.add(kid)
        if error is not None and kid not in self._bad:
            self._bad.add(kid)
            if len(self.first_bad) < self.keep:
                self.first_bad.append(f"{key} ({error})")
                self.first_bad_keys.append(key)
            log.warning("skipping corrupt sample %s: %s (%d of %d so far)", key, error, self.bad, self.seen)
        if self._bad:
            self.check()

    def record_all(self, events: Iterable[Event]) -> None:
        """Count events a worker attached to a sample (main process)."""
        for key, error in events:
            self.record(key, error)

    def attach(self, sample: dict[str, Any]) -> dict[str, Any]:
        """In a worker: ``sample`` with the events since the last call under :data:`EVENTS_KEY`;
        in the main process (nothing pending) ``sample`` unchanged."""
        if not self._pending:
            return sample
        events, self._pending = self._pending, []
        return {**sample, EVENTS_KEY: events}

    def check(self) -> None:
        """Raise :class:`DataError` when the failure fraction is over the limit."""
        if self.seen >= self.min_seen and self.bad / self.seen > self.max_fraction:
            raise DataError(
                f"{self.bad} of {self.seen} samples could not be decoded "
                f"({self.bad / self.seen:.1%} > max_bad_sample_fraction {self.max_fraction:.1%}); "
                f"first bad samples: {'; '.join(self.first_bad)}")

    def summary(self, *, first: int = 5) -> dict[str, Any]:
        """``{"skipped_samples": n, "first_skipped": [keys ...]}`` for a run's summary."""
        return {"skipped_samples": self.bad, "first_skipped": self.first_bad_keys[:first]}
