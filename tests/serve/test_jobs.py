"""The job board without a model: first in, first out; the bounded queue; cancel; the history
of finished jobs it keeps; and the request defaults a job's [task] keys set."""

from __future__ import annotations

import attrs
import pytest

from t2i_engine.serve.jobs import Job, JobBoard, QueueFull


def _job(name: str) -> Job:
    return Job(params={"prompt": name}, config=None)


def test_fifo_bounded_cancel_and_history():
    board = JobBoard(queue_size=2, history=2)
    a, b, c = _job("a"), _job("b"), _job("c")
    assert (board.submit(a), board.submit(b)) == (0, 1)
    with pytest.raises(QueueFull, match=r"the queue is full \(2 generations waiting; task.queue_size\)"):
        board.submit(c)
    assert board.next(timeout=0) is a and a.state == "running"
    assert board.submit(c) == 1  # a left the queue: room again
    assert board.cancel(b) and b.state == "cancelled" and [e["event"] for e in b.events] == ["queued", "cancelled"]
    assert board.next(timeout=0) is c
    board.finish(a, "done")
    board.finish(c, "done")
    assert not board.cancel(a)  # finished already
    d = _job("d")
    board.submit(d)
    board.next(timeout=0)
    board.finish(d, "failed", message="boom")
    # history = 2: of the finished a, b, c, d only the two newest are kept
    assert [j.params["prompt"] for j in board.jobs()] == ["d", "c"]
    assert board.get(a.id) is None and board.get(d.id) is d
    assert d.events[-1] == {"id": 1, "event": "failed", "data": {"job": d.id, "message": "boom"}}


def test_close_cancels_what_waits_and_wakes_the_worker():
    board = JobBoard(queue_size=4, history=10)
    waiting = _job("w")
    board.submit(waiting)
    board.close()
    assert waiting.state == "cancelled" and waiting.events[-1]["data"]["reason"] == "server stopping"
    assert board.next(timeout=1) is None


def test_request_defaults_come_from_the_task_keys(served):
    from t2i_engine.serve.requests import RequestBuilder

    _, worker, ctx = served
    serve = attrs.evolve(ctx.config.task.options, negative_prompt="ugly", width=24, height=8)
    builder = RequestBuilder(ctx, serve, factor=worker.factor, generator=worker.generator)
    job = builder.build({"prompt": "x", "seed": 1}, {})
    options = job.config.task.options
    assert (options.negative_prompt, options.width, options.height) == ("ugly", 24, 8)
    assert (job.params["negative_prompt"], job.params["width"], job.params["height"]) == ("ugly", 24, 8)
    given = builder.build({"prompt": "x", "negative_prompt": "", "width": 16}, {})
    assert (given.config.task.options.negative_prompt, given.config.task.options.width) == ("", 16)


def test_a_finished_job_keeps_no_previews():
    board = JobBoard(queue_size=1, history=1)
    job = _job("p")
    board.submit(job)
    board.next(timeout=0)
    job.emit("step", step=1, total=2, preview="data:image/png;base64,AAAA")
    board.finish(job, "done", image="/x")
    assert [e["data"] for e in job.events if e["event"] == "step"] == [{"job": job.id, "step": 1, "total": 2}]
