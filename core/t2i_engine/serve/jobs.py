"""Generation jobs, their event logs, and the bounded queue a single worker drains.

A :class:`Job` is created by the HTTP layer from a validated request and lives in a
:class:`JobBoard`: the bounded queue of waiting jobs (``task.queue_size``; one more is refused)
plus every known job by id, finished ones kept up to ``task.history``. Each job has an
append-only list of events (``queued``, ``started``, ``step``, ``done``, ``failed``,
``cancelled``) that server-sent-event streams replay from any index, so a client that connects
late or reconnects (``Last-Event-ID``) misses nothing.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["FINAL_STATES", "Job", "JobBoard", "QueueFull"]

State = Literal["queued", "running", "done", "failed", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs already (HTTP 429)."""


@dataclass
class Job:
    """One generation: what was asked (``params``, shown to clients), the per-request run
    config the worker samples with, its files (server-made names only) and its events."""

    params: dict[str, Any]
    config: Any  # the per-request RunConfig (a sample job of one image)
    inputs: dict[str, str] = field(default_factory=dict)  # upload field -> file in the output folder
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: State = "queued"
    created: float = field(default_factory=time.time)
    image: str | None = None  # the PNG written, once done
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, **data: Any) -> None:
        """Append an event (its id is its index in the log)."""
        self.events.append({"id": len(self.events), "event": kind, "data": {"job": self.id, **data}})

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def summary(self) -> dict[str, Any]:
        """What the API shows of the job (no file paths: URLs the server answers by id)."""
        out: dict[str, Any] = {"id": self.id, "state": self.state, "created": self.created, "params": self.params,
                               "inputs": sorted(self.inputs), "error": self.error}
        if self.image is not None:
            out |= {"image": f"/api/generations/{self.id}/image", "metadata": self.metadata}
        return out


class JobBoard:
    """The waiting queue (bounded), the jobs by id, and the hand-over to the worker thread."""

    def __init__(self, *, queue_size: int, history: int) -> None:
        self.queue_size, self.history = queue_size, history
        self._waiting: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False

    def check_room(self) -> None:
        """:class:`QueueFull` when ``queue_size`` jobs wait."""
        if len(self._waiting) >= self.queue_size:
            raise QueueFull(f"the queue is full ({self.queue_size} generations waiting; task.queue_size); "
                            "try again later")

    def submit(self, job: Job) -> int:
        """Queue ``job``; its position (0: next). :class:`QueueFull` when ``queue_size`` wait."""
        with self._cond:
            self.check_room()
            self._waiting.append(job)
            self._jobs[job.id] = job
            job.emit("queued", position=len(self._waiting) - 1)
            self._forget_old()
            self._cond.notify_all()
            return len(self._waiting) - 1

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished]
        for job in finished[:max(0, len(finished) - self.history)]:
            del self._jobs[job.id]

    def next(self, timeout: float | None = None) -> Job | None:
        """The next waiting job, marked running (None once closed, or after ``timeout``)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting or self._closed, timeout=timeout) or self._closed:
                return None
            job = self._waiting.popleft()
            job.state = "running"
            return job

    def finish(self, job: Job, state: State, **data: Any) -> None:
        """Record the end of ``job`` (the worker's side) and emit its last event. Its previews
        are dropped from the log (the image replaces them), so a kept job stays small."""
        with self._cond:
            job.state = state
            for event in job.events:
                event["data"].pop("preview", None)
            self._forget_old()
        job.emit(state, **data)

    def cancel(self, job: Job) -> bool:
        """Cancel ``job``: a waiting one leaves the queue now, a running one stops at its next
        step (the worker emits ``cancelled``). False when it had finished already."""
        with self._cond:
            if job.finished:
                return False
            job.cancel_requested.set()
            if job in self._waiting:
                self._waiting.remove(job)
                job.state = "cancelled"
                job.emit("cancelled")
            return True

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """Every known job, newest first."""
        with self._cond:
            return list(reversed(self._jobs.values()))

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def close(self) -> None:
        """Wake the worker so it stops; waiting jobs are cancelled."""
        with self._cond:
            self._closed = True
            while self._waiting:
                job = self._waiting.popleft()
                job.state = "cancelled"
                job.emit("cancelled", reason="server stopping")
            self._cond.notify_all()
