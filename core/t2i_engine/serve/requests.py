"""From an HTTP request's parameters and uploads to a :class:`~t2i_engine.serve.jobs.Job`.

Every key goes through the validators a job file's keys go through
(:func:`~t2i_engine.config.structure.structure` of the generator's ``Request`` class and the
loader's component lookup), so a request gets the message a job file would, naming the key. The
served generator (:mod:`t2i_engine.serve.generators`) turns the validated request into a
one-image job (for the core's ``text-to-image``: a ``sample`` job, whose PNG carries the
``sample`` task's metadata and re-runs with ``t2i-engine run --from-png``).

Uploads are decoded and re-encoded as PNG under ``<output>/inputs/`` with names the server makes
(the job id and an index); nothing the client sends is ever used as a path.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from t2i_engine.checkpoint.io import atomic_write_bytes
from t2i_engine.config.loader import _component
from t2i_engine.config.structure import structure, unstructure
from t2i_engine.errors import ConfigError
from t2i_engine.serve.config import ServeConfig
from t2i_engine.serve.generators import INIT_IMAGE, Draft, upload_fields
from t2i_engine.serve.jobs import Job

__all__ = ["INIT_IMAGE", "RequestBuilder", "RequestError", "upload_fields"]

_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class RequestError(Exception):
    """A request the server refuses: ``status`` (400, 413, 422, 429 ...) and a message for a person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _no_location(_: str) -> str:
    return ""


class RequestBuilder:
    """Validates requests against the served job and turns them into jobs through ``generator``
    (set up: :mod:`t2i_engine.serve.generators`)."""

    def __init__(self, ctx: Any, serve: ServeConfig, *, factor: int, generator: Any) -> None:
        self.ctx, self.serve, self.factor, self.generator = ctx, serve, factor, generator
        self.fields = upload_fields(ctx.config)  # conditioner inputs -> (entry, name)
        self.uploads = {u.field: u for u in generator.uploads(ctx.config)}
        self.inputs_dir = Path(ctx.output_dir) / "inputs"
        self._check_defaults()

    def _check_defaults(self) -> None:
        """The job's own defaults must be requests this server takes (else every request fails)."""
        steps = getattr(self.ctx.config.sampler.options, "steps", None)
        if isinstance(steps, int) and steps > self.serve.max_steps:
            raise ConfigError(f"task.max_steps: {self.serve.max_steps} is below the job's own sampler.steps ({steps})")
        taken = {field.name for field in attrs.fields(self.generator.Request)}
        for key in ("width", "height"):  # an editor's output has the source's size: no default to check
            side = getattr(self.serve, key)
            if key not in taken:
                continue
            if side > self.serve.max_side:
                raise ConfigError(f"task.{key}: {side} is above task.max_side ({self.serve.max_side})")
            if side % self.factor:
                raise ConfigError(f"task.{key}: must be a multiple of {self.factor} (the autoencoder's factor), "
                                  f"got {side}")

    # --- parameters -----------------------------------------------------------------------

    def parse(self, raw: Any) -> Any:
        """The request's keys, validated against the generator's ``Request`` class (a ConfigError
        naming ``request.<key>``)."""
        if not isinstance(raw, Mapping):
            raise RequestError(400, f"request: expected a JSON object, got {type(raw).__name__}")
        request = structure(self.generator.Request, raw, "request")
        for key in ("width", "height"):
            side = getattr(request, key, None)
            if side is not None and side > self.serve.max_side:
                raise ConfigError(f"request.{key}: at most {self.serve.max_side} pixels on this server "
                                  f"(task.max_side): {side}")
        steps = getattr(request, "steps", None)
        if steps is not None and steps > self.serve.max_steps:
            raise ConfigError(f"request.steps: at most {self.serve.max_steps} on this server (task.max_steps): "
                              f"{steps}")
        return request

    def _sampler(self, request: Any) -> Any:
        base = self.ctx.config.sampler
        name = getattr(request, "sampler", None) or base.name
        table: dict[str, Any] = dict(unstructure(base.options) or {}) if name == base.name else {}
        table = {k: v for k, v in table.items() if v is not None}
        if getattr(request, "steps", None) is not None:
            table["steps"] = request.steps
        return _component(self.ctx.plugins, "sampler", {"name": name, **table}, _no_location,
                          kind="sampler", selector="name")

    def _guidance(self, request: Any) -> Any:
        from t2i_engine.diffusion.guidance import GuidanceConfig

        base = self.ctx.config.guidance or GuidanceConfig()
        if getattr(request, "guidance_scale", None) is None:
            return self.ctx.config.guidance
        return structure(GuidanceConfig, {**unstructure(base), "guidance_scale": request.guidance_scale}, "guidance")

    # --- uploads ----------------------------------------------------------------------------

    def _image(self, field: str, data: bytes) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(data))
            if image.format not in _IMAGE_FORMATS:
                raise ConfigError(f"{field}: a {image.format} file; upload PNG, JPEG, WebP, BMP or GIF")
            limit = 4 * self.serve.max_side
            if max(image.size) > limit:
                raise ConfigError(f"{field}: {image.size[0]}x{image.size[1]} pixels; at most {limit} a side")
            return image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{field}: the upload is not a readable image ({type(exc).__name__})") from None

    def _save_uploads(self, job_id: str, files: Mapping[str, bytes]) -> dict[str, str]:
        from t2i_engine.utils.images import png_bytes

        unknown = [f for f in files if f not in self.uploads]
        if unknown:
            valid = ", ".join(self.uploads) or "none"
            raise ConfigError(f"{unknown[0]}: not an upload this server takes; valid fields: {valid}")
        missing = [u for u in self.uploads.values() if u.required and u.field not in files]
        if missing:
            raise ConfigError(f"{missing[0].field}: this server needs this upload ({missing[0].label}); send it as "
                              f"the multipart field '{missing[0].field}'")
        images = {field: self._image(field, data) for field, data in files.items()}  # all checked before any write
        saved: dict[str, str] = {}
        try:
            for n, (field, image) in enumerate(sorted(images.items())):
                path = self.inputs_dir / f"{job_id}-{n}.png"  # server-made: the job id and an index
                atomic_write_bytes(str(path), png_bytes(image))
                saved[field] = str(path)
        except BaseException:
            self.discard(saved)
            raise
        return saved

    # --- the job ------------------------------------------------------------------------------

    def build(self, raw: Any, files: Mapping[str, bytes]) -> Job:
        """A queued-to-be :class:`Job` for the request (uploads written), made by the
        generator's ``prepare``; ConfigError or :class:`RequestError` when it is refused (nothing
        is left written then)."""
        from t2i_engine.diffusion.guidance import GuidanceConfig

        request = self.parse(raw)
        sampler, guidance = self._sampler(request), self._guidance(request)
        width = getattr(request, "width", None) or self.serve.width
        height = getattr(request, "height", None) or self.serve.height
        if width % self.factor or height % self.factor:
            raise ConfigError(f"request.width/height: must be multiples of {self.factor} (the autoencoder's "
                              f"factor), got {width}x{height}")
        seed = request.seed if getattr(request, "seed", None) is not None else secrets.randbelow(2**32)
        negative = getattr(request, "negative_prompt", None)
        negative = self.serve.negative_prompt if negative is None else negative
        job = Job(params={}, config=None)
        inputs = self._save_uploads(job.id, files)
        try:
            conditioners = list(self.ctx.config.conditioners)
            for field, path in inputs.items():
                if field in self.fields:
                    i, name = self.fields[field]
                    keys = conditioners[i].keys
                    conditioners[i] = attrs.evolve(conditioners[i], keys=attrs.evolve(keys, inputs={**keys.inputs,
                                                                                                       name: path}))
            base = attrs.evolve(self.ctx.config, sampler=sampler, guidance=guidance, conditioners=conditioners)
            config, shown = self.generator.prepare(Draft(request=request, config=base, inputs=inputs, seed=seed,
                                                         negative_prompt=negative, width=width, height=height,
                                                         max_side=self.serve.max_side))
        except BaseException:
            self.discard(inputs)
            raise
        job.config, job.inputs = config, inputs
        job.params = {"prompt": request.prompt, "negative_prompt": negative, "sampler": sampler.name,
                      "steps": getattr(sampler.options, "steps", None),
                      "guidance_scale": (guidance or GuidanceConfig()).guidance_scale, "seed": seed, **shown}
        return job

    def discard(self, inputs: Mapping[str, str]) -> None:
        """Remove uploads of a job that was refused after they were written."""
        for path in inputs.values():
            Path(path).unlink(missing_ok=True)
