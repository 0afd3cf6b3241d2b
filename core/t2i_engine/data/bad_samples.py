"""Counting corrupt samples: each is skipped and logged; too many stop the run."""

from __future__ import annotations

import logging

from t2i_engine.errors import DataError

__all__ = ["BadSamples"]

log = logging.getLogger("t2i_engine.data")


class BadSamples:
    """Per-process tally of samples read and samples that failed to decode.

    Once at least ``min_seen`` samples were attempted, a failure fraction above
    ``max_fraction`` raises :class:`DataError` naming the first bad samples. The training loop
    sets ``max_fraction`` from ``train.max_bad_sample_fraction``.
    """

    def __init__(self, *, max_fraction: float = 0.01, min_seen: int = 32, keep: int = 10) -> None:
        self.max_fraction = max_fraction
        self.min_seen = min_seen
        self.keep = keep
        self.seen = 0
        self.bad = 0
        self.first_bad: list[str] = []

    def ok(self) -> None:
        """Count a sample that decoded (and raise if earlier failures are now over the limit)."""
        self.seen += 1
        if self.bad:
            self.check()

    def failed(self, key: str, error: BaseException) -> None:
        """Count, log and remember a sample that did not decode; raise when over the limit."""
        self.seen += 1
        self.bad += 1
        if len(self.first_bad) < self.keep:
            self.first_bad.append(f"{key} ({type(error).__name__}: {error})")
        log.warning("skipping corrupt sample %s: %s (%d of %d so far)", key, error, self.bad, self.seen)
        self.check()

    def check(self) -> None:
        """Raise :class:`DataError` when the failure fraction is over the limit."""
        if self.seen >= self.min_seen and self.bad / self.seen > self.max_fraction:
            raise DataError(
                f"{self.bad} of {self.seen} samples could not be decoded "
                f"({self.bad / self.seen:.1%} > max_bad_sample_fraction {self.max_fraction:.1%}); "
                f"first bad samples: {'; '.join(self.first_bad)}")
