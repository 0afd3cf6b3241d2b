"""The resident model and the single worker thread that runs every generation in turn.

One model is built when the server starts (:func:`~t2i_engine.tasks.common.build_model`, the
job's ``[[adapters]]`` applied, ``engine.precision`` prepared once) with the job's
``[[conditioners]]`` around it, and one generator (:mod:`t2i_engine.serve.generators`) makes each
image with it: the core's ``text-to-image`` samples exactly as the ``sample`` task does with
``batch_size = 1`` (its seed's noise, a generator seeded by it, the same plan), so the PNG it writes
re-runs to the same pixels with ``t2i-engine run --from-png``; a plugin's (InstructPix2Pix's
``edit``) samples its own way. The worker owns the thread, cancellation, progress events and
previews, and writes the PNG.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import threading
import traceback
from typing import Any

import torch

from t2i_engine.errors import ConfigError, T2IError
from t2i_engine.serve.config import ServeConfig
from t2i_engine.serve.jobs import Job, JobBoard

__all__ = ["Cancelled", "Worker"]

log = logging.getLogger("t2i_engine.serve")


class Cancelled(Exception):
    """Raised inside the sampler's step callback when the running job was cancelled."""


class Worker:
    """Owns the model; :meth:`start` runs jobs from ``board`` on one thread until :meth:`stop`."""

    def __init__(self, ctx: Any, serve: ServeConfig, board: JobBoard) -> None:
        from t2i_engine.conditioning.build import build_conditioners
        from t2i_engine.serve.generators import Resident, choose_generator
        from t2i_engine.tasks.common import build_model, inference_precision

        if ctx.config.sampler is None:
            raise ConfigError("sampler: task 'serve' needs a [sampler] table (the requests' default sampler and "
                              "steps), e.g. name = \"ddim\" and steps = 30")
        self.ctx, self.serve, self.board = ctx, serve, board
        self.model = build_model(ctx, task="serve")
        self.autocast, self.dtype = inference_precision(ctx, self.model)
        self.conditioners = build_conditioners(ctx, self.model, dtype=self.dtype)
        self.factor = int(self.model.autoencoder.downsample_factor)
        self.generator_name, self.generator = choose_generator(ctx, self.model, serve.generator)
        self.generator.setup(Resident(ctx=ctx, model=self.model, dtype=self.dtype, autocast=self.autocast,
                                      conditioners=self.conditioners))
        self._thread: threading.Thread | None = None
        self._samplers: dict[Any, Any] = {}

    @property
    def model_name(self) -> str:
        return str(getattr(self.model, "description", None) or self.ctx.config.model.name)

    # --- the thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="t2i-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.board.close()
        for job in self.board.jobs():
            if job.state == "running":
                job.cancel_requested.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while (job := self.board.next()) is not None:
            self.run(job)

    def run(self, job: Job) -> None:
        """Run ``job`` to its end: ``done`` with the image, ``cancelled`` or ``failed`` with a message."""
        if job.cancel_requested.is_set():
            self.board.finish(job, "cancelled")
            return
        try:
            path, metadata = self._generate(job)
        except Cancelled:
            self.board.finish(job, "cancelled")
        except T2IError as exc:
            job.error = str(exc)
            self.board.finish(job, "failed", message=job.error)
        except Exception as exc:  # noqa: BLE001 - the worker must outlive any one job
            log.error("generation %s failed:\n%s", job.id, traceback.format_exc())
            job.error = f"internal error: {type(exc).__name__}: {exc}"
            self.board.finish(job, "failed", message=job.error)
        else:
            job.image, job.metadata = path, metadata
            self.board.finish(job, "done", image=f"/api/generations/{job.id}/image", metadata=metadata)

    # --- one generation -------------------------------------------------------------------------

    def _sampler(self, component: Any) -> Any:
        key = (component.name, repr(component.options))
        if key not in self._samplers:
            if len(self._samplers) >= 32:  # requests vary steps and samplers: keep the cache small
                self._samplers.clear()
            self._samplers[key] = self.ctx.plugins.build(component)
        return self._samplers[key]

    def _use_inputs(self, config: Any) -> None:
        """Point the resident conditioners at this job's inputs (its uploads, else the job's files)."""
        if self.conditioners is None:
            return
        for entry, component in zip(self.conditioners.entries, config.conditioners):
            entry.keys = component.keys
        self.conditioners.clear_inputs()

    def _preview(self, denoised: torch.Tensor) -> str:
        from t2i_engine.utils.images import png_bytes, to_pil

        with torch.no_grad(), self.autocast:
            image = self.model.autoencoder.decode(denoised[:1].to(self.dtype)).clamp_(-1, 1)
        pil = to_pil(image.float())[0]
        pil.thumbnail((self.serve.preview_size, self.serve.preview_size))
        return "data:image/png;base64," + base64.b64encode(png_bytes(pil)).decode("ascii")

    def _callback(self, job: Job, total: int) -> Any:
        every = self.serve.preview_every

        def report(info: dict[str, Any]) -> None:
            if job.cancel_requested.is_set():
                raise Cancelled
            step = int(info["i"]) + 1
            data: dict[str, Any] = {"step": step, "total": total}
            if every and step % every == 0 and step < total and info.get("denoised") is not None:
                data["preview"] = self._preview(info["denoised"])
            job.emit("step", **data)
            self.ctx.plugins.hook.on_sample_step(step=step, total=total, sigma=float(info["sigma"]))

        return report

    def _generate(self, job: Job) -> tuple[str, dict[str, str]]:
        from t2i_engine.utils.images import save_png

        config = job.config
        sampler = self._sampler(config.sampler)
        self._use_inputs(config)

        def progress(total: int) -> Any:
            job.emit("started", total=total)
            return self._callback(job, total)

        pil, metadata = self.generator.generate(dataclasses.replace(self.ctx, config=config), sampler, progress)
        path = str(self.ctx.output_dir / f"{job.id}.png")  # server-made: the job id
        save_png(pil, path, metadata=metadata)  # atomic
        return path, metadata
