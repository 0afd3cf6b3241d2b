"""The HTTP API and the web page (FastAPI on uvicorn).

==========================================  ===============================================
``GET  /``                                   the web page (files shipped in the package)
``GET  /api/info``                           the model, the defaults, samplers, upload fields
``POST /api/generations``                    submit (JSON, or multipart with uploads) -> 202 + id
``GET  /api/generations``                    the gallery: known generations, newest first
``GET  /api/generations/{id}``               one generation's state, parameters and metadata
``GET  /api/generations/{id}/events``        server-sent events: queued, started, step, done ...
``GET  /api/generations/{id}/image``         the PNG (with the ``sample`` task's metadata)
``GET  /api/generations/{id}/inputs/{field}`` an uploaded input, as stored
``DELETE /api/generations/{id}``             cancel (waiting: at once; running: at its next step)
==========================================  ===============================================

Refusals carry ``{"error": message}``: 400 (unreadable body), 401 (token), 404, 409 (already
finished), 413 (body over ``max_upload_bytes``), 415, 422 (a key's value: the job-file message),
429 (queue full).
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at definition

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from t2i_engine.errors import ConfigError, StorageError
from t2i_engine.serve.forms import parse_body, read_body
from t2i_engine.serve.jobs import Job, JobBoard, QueueFull
from t2i_engine.serve.requests import RequestBuilder, RequestError

__all__ = ["Service", "create_app"]

_POLL_S = 0.05  # how often an event stream looks for new events
_HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream


@dataclass
class Service:
    """What the routes need: the job board, the request builder and what ``/api/info`` shows."""

    board: JobBoard
    builder: RequestBuilder
    info: dict[str, Any]
    token: str | None = None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _sse(event: dict[str, Any]) -> str:
    return f"id: {event['id']}\nevent: {event['event']}\ndata: {json.dumps(event['data'])}\n\n"


async def _events(job: Job, start: int, disconnected: Any) -> AsyncIterator[str]:
    """Every event of ``job`` from index ``start``, as they come, until its final one."""
    i, idle = start, 0.0
    yield "retry: 1000\n\n"
    while True:
        while i < len(job.events):
            event = job.events[i]
            yield _sse(event)
            i += 1
            idle = 0.0
            if event["event"] in ("done", "failed", "cancelled"):
                return
        if await disconnected():
            return
        await asyncio.sleep(_POLL_S)
        idle += _POLL_S
        if idle >= _HEARTBEAT_S:
            idle = 0.0
            yield ": keep-alive\n\n"


def create_app(service: Service) -> Any:
    """The FastAPI application over ``service``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="t2i-engine", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    static = files("t2i_engine.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.middleware("http")
    async def bearer_token(request: Request, call_next: Any) -> Any:
        if service.token is not None and request.url.path.startswith("/api/") \
                and request.url.path != "/api/openapi.json":
            sent = request.headers.get("authorization", "")
            scheme, _, value = sent.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), service.token.encode()):
                return _error(401, "this server needs a bearer token (Authorization: Bearer ...)",
                              {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    def job_or_404(job_id: str) -> Job:
        job = service.board.get(job_id)
        if job is None:
            raise RequestError(404, f"no generation '{job_id[:64]}' on this server")
        return job

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> Any:
        return _error(exc.status, exc.message)

    @app.exception_handler(ConfigError)
    async def config_error(_: Request, exc: ConfigError) -> Any:
        return _error(422, str(exc))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> Any:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/api/info")
    async def info() -> Any:
        return {**service.info, "queue": {"waiting": service.board.waiting(), "size": service.board.queue_size}}

    @app.post("/api/generations", status_code=202)
    async def submit(request: Request) -> Any:
        try:
            service.board.check_room()  # early, before the body is read; submit checks again
        except QueueFull as exc:
            return _error(429, str(exc), {"Retry-After": "5"})
        limit = service.builder.serve.max_upload_bytes
        body = await read_body(request.stream(), declared=request.headers.get("content-length"), limit=limit)
        params, uploads = parse_body(body, request.headers.get("content-type", ""), limit=limit)
        try:
            job = await asyncio.to_thread(service.builder.build, params, uploads)
        except StorageError as exc:
            return _error(507, str(exc))
        try:
            position = service.board.submit(job)
        except QueueFull as exc:
            service.builder.discard(job.inputs)
            return _error(429, str(exc), {"Retry-After": "5"})
        return JSONResponse({"id": job.id, "position": position, "params": job.params,
                             "events": f"/api/generations/{job.id}/events",
                             "status": f"/api/generations/{job.id}"}, status_code=202)

    @app.get("/api/generations")
    async def gallery() -> Any:
        return {"generations": [job.summary() for job in service.board.jobs()]}

    @app.get("/api/generations/{job_id}")
    async def status(job_id: str) -> Any:
        return job_or_404(job_id).summary()

    @app.get("/api/generations/{job_id}/events")
    async def events(job_id: str, request: Request) -> Any:
        job = job_or_404(job_id)
        last = request.headers.get("last-event-id", "")
        start = int(last) + 1 if last.isdigit() else 0
        return StreamingResponse(_events(job, start, request.is_disconnected), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/generations/{job_id}/image")
    async def image(job_id: str) -> Any:
        job = job_or_404(job_id)
        if job.image is None:
            raise RequestError(409 if not job.finished else 404, f"generation '{job_id}' has no image ({job.state})")
        return FileResponse(job.image, media_type="image/png", filename=f"{job.id}.png")

    @app.get("/api/generations/{job_id}/inputs/{field}")
    async def upload(job_id: str, field: str) -> Any:
        job = job_or_404(job_id)
        if field not in job.inputs:
            raise RequestError(404, f"generation '{job_id}' has no upload '{field[:64]}'")
        return FileResponse(job.inputs[field], media_type="image/png")

    @app.delete("/api/generations/{job_id}", status_code=202)
    async def cancel(job_id: str) -> Any:
        job = job_or_404(job_id)
        if not service.board.cancel(job):
            raise RequestError(409, f"generation '{job_id}' has finished already ({job.state})")
        return JSONResponse({"id": job.id, "state": job.state}, status_code=202)

    return app
