"""``serve``: the task behind ``t2i-engine serve JOB.toml`` (and ``t2i-engine run`` of the same job)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_engine.serve.config import ServeConfig

__all__ = ["ServeTask", "build_service", "listen"]


def _token(serve: ServeConfig) -> str | None:
    if serve.token_env is None:
        return None
    token = os.environ.get(serve.token_env, "")
    if not token.strip():
        raise ConfigError(f"task.token_env: the environment variable '{serve.token_env}' is not set (or empty); "
                          "set it to the bearer token clients must send, or remove the key")
    return token.strip()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port); a ConfigError naming the keys
    when it cannot be had (in use, no such address)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(f"task.host/port: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _info(ctx: RunContext, serve: ServeConfig, worker: Any, builder: Any) -> dict[str, Any]:
    import attrs

    from t2i_engine.config.fields import HELP_META
    from t2i_engine.config.structure import unstructure
    from t2i_engine.diffusion.guidance import GuidanceConfig
    from t2i_engine.serve.config import GenerationRequest

    sampler = ctx.config.sampler
    guidance = ctx.config.guidance or GuidanceConfig()
    generator = worker.generator
    uploads = [{"field": u.field, "label": u.label, "required": u.required} for u in builder.uploads.values()]
    fields = attrs.fields(generator.Request)
    common = {f.name for f in attrs.fields(GenerationRequest)}
    return {
        "model": worker.model_name,
        "generator": worker.generator_name,
        "keys": [f.name for f in fields],  # the request keys this server takes
        "extra": [{"key": f.name, "label": f.metadata.get(HELP_META, f.name)} for f in fields if f.name not in common],
        "defaults": {"negative_prompt": serve.negative_prompt, "width": serve.width, "height": serve.height,
                     "sampler": sampler.name, "steps": (unstructure(sampler.options) or {}).get("steps"),
                     "guidance_scale": guidance.guidance_scale, **generator.defaults(ctx.config)},
        "limits": {"max_side": serve.max_side, "max_steps": serve.max_steps, "multiple_of": worker.factor,
                   "max_upload_bytes": serve.max_upload_bytes},
        "samplers": sorted(ctx.plugins.registry("sampler")),
        "uploads": uploads,
        "conditioners": [c.name for c in ctx.config.conditioners],
        "adapters": [str(a.path) for a in ctx.config.adapters],
        "token_required": serve.token_env is not None,
    }


def build_service(ctx: RunContext, serve: ServeConfig) -> tuple[Any, Any]:
    """``(service, worker)``: the model built and resident, the worker not yet started."""
    from t2i_engine.serve.app import Service
    from t2i_engine.serve.jobs import JobBoard
    from t2i_engine.serve.requests import RequestBuilder
    from t2i_engine.serve.worker import Worker

    token = _token(serve)
    board = JobBoard(queue_size=serve.queue_size, history=serve.history)
    worker = Worker(ctx, serve, board)
    builder = RequestBuilder(ctx, serve, factor=worker.factor, generator=worker.generator)
    return Service(board=board, builder=builder, info=_info(ctx, serve, worker, builder), token=token), worker


class ServeTask:
    """Serve the job's model over HTTP until interrupted (Ctrl-C); every image lands in
    ``engine.output_dir`` as ``<id>.png``, uploads in ``inputs/``."""

    Config = ServeConfig
    applies_conditioners = True  # built once, their inputs replaceable per request

    def __init__(self, config: ServeConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        try:
            import uvicorn

            from t2i_engine.serve.app import create_app
        except ImportError as exc:
            raise ConfigError(f"task.name: 'serve' needs FastAPI and uvicorn ({exc.name} is missing); "
                              "pip install 't2i-engine[serve]'") from exc
        service, worker = build_service(ctx, self.config)
        sock = listen(self.config.host, self.config.port)
        host, port = sock.getsockname()[:2]
        worker.start()
        server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="info", access_log=False,
                                               timeout_graceful_shutdown=5))  # open event streams: 5 s, then closed
        print(f"t2i-engine serve: model '{worker.model_name}', generator '{worker.generator_name}' on "
              f"http://{host}:{port}/ "
              f"(output: {ctx.output_dir})", flush=True)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: for a server, the way to stop
            pass
        finally:
            worker.stop()
            sock.close()
        done = [j for j in service.board.jobs() if j.state == "done"]
        return {"served": len(done), "output_dir": str(ctx.output_dir)}
