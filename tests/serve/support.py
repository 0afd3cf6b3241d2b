"""Shared by the serve tests: a served tiny Stable Diffusion (the ``tiny`` preset the sample
tests use) with a toy conditioner that records the images it is given, and a hook that can hold
a generation at a step, so cancellation and a full queue are tested without timing."""

from __future__ import annotations

import socket
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from t2i_engine.config.loader import load_config
from t2i_engine.hookspecs import hookimpl
from t2i_engine.interfaces import ConditionInputs, Conditioning, RunContext
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import resolve_device

pytest.importorskip("fastapi", reason="t2i-engine serve needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="t2i-engine serve needs the [serve] extra (fastapi, uvicorn)")


class HintRecorder:
    """A conditioner that keeps the ``hint`` image of each generation (it changes nothing)."""

    seen: list[Any] = []

    def condition(self, cond: Conditioning, inputs: ConditionInputs) -> Conditioning:
        if inputs.branch == "cond":
            HintRecorder.seen.append(inputs.images["hint"].detach().clone())
        return cond


class Gate:
    """An ``on_sample_step`` hook: while ``hold`` is set, the worker waits at each step until ``release``."""

    def __init__(self) -> None:
        self.hold = False
        self.release = threading.Event()
        self.waiting = threading.Event()

    @hookimpl
    def on_sample_step(self, step: int, total: int, sigma: float) -> None:
        if self.hold:
            self.waiting.set()
            assert self.release.wait(60), "the test never released the gate"


def write_job(folder: Path, *, queue_size: int = 2, extra: str = "", conditioners: bool = True) -> Path:
    """A serve job over the tiny SD preset with a hint conditioner whose default is a grey image."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (128, 128, 128)).save(folder / "hint.png")
    job = folder / "serve.toml"
    job.write_text(f"""[engine]
plugins = ["sd"]
device = "cpu"
output_dir = "out"

[task]
name = "serve"
width = 16
height = 16
queue_size = {queue_size}
preview_every = 1
preview_size = 16
max_upload_bytes = 200000
{extra}

[model]
type = "stable-diffusion"
preset = "tiny"

[sampler]
name = "ddim"
steps = 2

""" + ("""
[[conditioners]]
type = "hint-recorder"
inputs = { hint = "hint.png" }
""" if conditioners else ""))
    return job


def write_edit_job(folder: Path, model: Path, *, steps: int, text_scale: float, image_scale: float) -> Path:
    """A serve job over an InstructPix2Pix folder ``model`` (no ``generator`` key: chosen for the model)."""
    job = folder / "serve.toml"
    job.write_text(f"""[engine]
plugins = ["sd", "instructpix2pix"]
device = "cpu"
output_dir = "out"
[task]
name = "serve"
max_side = 32             # below the default width/height (512), which an edit does not use
[model]
type = "stable-diffusion"
checkpoint = "{model}"
preset = "sd-1"
[sampler]
name = "ddim"
steps = {steps}
[guidance]
guidance_scale = {text_scale}
image_guidance_scale = {image_scale}
""")
    return job


def edit_plugin_manager() -> EnginePluginManager:
    """The SD and InstructPix2Pix plugins under test, whether or not they are installed."""
    import t2i_plugin_instructpix2pix.plugin
    import t2i_plugin_sd.plugin

    pm = EnginePluginManager()
    pm.load(autoload=False)
    pm.register(t2i_plugin_sd.plugin, name="sd")
    pm.register(t2i_plugin_instructpix2pix.plugin, name="instructpix2pix")
    return pm


def plugin_manager(gate: Gate | None = None) -> EnginePluginManager:
    pm = EnginePluginManager().load()
    module = types.ModuleType("serve_test_conditioners")
    module.register_conditioners = hookimpl(lambda: {"hint-recorder": HintRecorder})  # type: ignore[attr-defined]
    pm.register(module, name="serve-test")
    if gate is not None:
        pm.register(gate, name="serve-gate")
    return pm


def start_service(job: Path, pm: EnginePluginManager) -> tuple[Any, Any, RunContext]:
    from t2i_engine.runner import writable_output_dir
    from t2i_engine.serve.task import build_service

    config = load_config(job, pm)
    ctx = RunContext(config=config, plugins=pm, output_dir=writable_output_dir(config.output_dir),
                     device=resolve_device("cpu"), seed=0)
    service, worker = build_service(ctx, config.task.options)
    worker.start()
    return service, worker, ctx


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from t2i_engine.serve.task import listen

        self.sock: socket.socket = listen("127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        import time

        for _ in range(200):  # wait until uvicorn has started (not a timing assertion)
            if self.server.started:
                break
            time.sleep(0.05)
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, gate: Gate) -> Iterator[tuple[Any, Any, RunContext]]:
    """``(service, worker, ctx)`` over a queue of 2, the worker running."""
    job = write_job(tmp_path_factory.mktemp("serve"))
    service, worker, ctx = start_service(job, plugin_manager(gate))
    yield service, worker, ctx
    gate.hold = False
    gate.release.set()
    worker.stop()
