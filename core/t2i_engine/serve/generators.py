"""Generators: what makes one served image with the resident model.

The serve worker holds one model and one generator, chosen once when the server starts
(:func:`choose_generator`): ``[task] generator`` names a registered one; left out, the server
takes the one generator that claims the model (``accepts(model)``; InstructPix2Pix's ``edit``
claims an 8-channel UNet), else the core's ``text-to-image`` (the ``sample`` task's way). Plugins
register generators through the ``register_generators`` hook (:mod:`t2i_engine.hookspecs`) as
they register tasks.

A generator is a class, called with no argument, with:

* ``Request``: the attrs class of the request keys it takes (:class:`GenerationRequest`, or its
  own); a key it does not take is refused with the job-file message (``request.width: unknown
  key ...``), and ``/api/info`` lists the keys so the page shows only their inputs;
* ``accepts(model) -> bool`` (a static method): whether it is made for that model;
* ``setup(resident)``: check the served job and model once at start (ConfigError naming the key)
  and keep the :class:`Resident` it samples with;
* ``uploads(config) -> list[Upload]``: the image fields a request may (``required``: must) send;
* ``defaults(config) -> dict``: the defaults of its own request keys (``/api/info``);
* ``prepare(draft) -> (RunConfig, params)``: the per-request job (a one-image job of the task it
  re-runs as, recorded in the PNG) and the parameters clients see; called on the HTTP side, it
  must not touch the model; ConfigError for a request it refuses (HTTP 422);
* ``generate(ctx, sampler, progress) -> (PIL image, PNG text chunks)``: on the worker thread;
  ``ctx.config`` is the prepared job; ``progress(total)`` is called once before the first step
  and returns the step callback to pass to the sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs

from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext, Sampler, StepCallback
from t2i_engine.serve.config import GenerationRequest

__all__ = ["DEFAULT_GENERATOR", "INIT_IMAGE", "Draft", "Generator", "Resident", "TextToImage", "Upload",
           "choose_generator", "upload_fields"]

DEFAULT_GENERATOR = "text-to-image"
"""The core's generator: prompt to image as the ``sample`` task makes it (img2img with ``init_image``)."""

INIT_IMAGE = "init_image"
"""The upload field of an img2img source image."""


@attrs.frozen
class Upload:
    """An image field of a request: its multipart name, a label for the page, whether it is required."""

    field: str
    label: str
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Resident:
    """What stays in memory: the model, its precision, the built ``[[conditioners]]``, the run."""

    ctx: RunContext
    model: Any
    dtype: Any
    autocast: Any
    conditioners: Any


@dataclasses.dataclass(frozen=True)
class Draft:
    """A validated request on its way to a job: the request's keys, the served job with this
    request's sampler, guidance and conditioner uploads, its stored uploads, and the resolved
    common values (``width``/``height``: the request's or ``task.width/height``; ``max_side``:
    the server's ``task.max_side``)."""

    request: Any
    config: Any
    inputs: Mapping[str, str]
    seed: int
    negative_prompt: str
    width: int
    height: int
    max_side: int


class Generator(Protocol):
    """See the module docstring."""

    Request: type

    @staticmethod
    def accepts(model: Any) -> bool: ...

    def setup(self, resident: Resident) -> None: ...

    def uploads(self, config: Any) -> list[Upload]: ...

    def defaults(self, config: Any) -> dict[str, Any]: ...

    def prepare(self, draft: Draft) -> tuple[Any, dict[str, Any]]: ...

    def generate(self, ctx: RunContext, sampler: Sampler,
                 progress: Callable[[int], StepCallback]) -> tuple[Any, dict[str, str]]: ...


def upload_fields(config: Any) -> dict[str, tuple[int, str]]:
    """The upload fields a job's ``[[conditioners]]`` give: ``conditioners.<i>.<name>`` for each
    input an entry names (the job's file is the default), -> (entry index, input name)."""
    return {f"conditioners.{i}.{name}": (i, name)
            for i, entry in enumerate(config.conditioners) for name in sorted(entry.keys.inputs)}


def choose_generator(ctx: RunContext, model: Any, name: str | None) -> tuple[str, Any]:
    """``(name, generator)`` for the served ``model``: the one ``task.generator`` names, else the
    one registered generator that claims the model, else :data:`DEFAULT_GENERATOR`. Not set up."""
    registry = ctx.plugins.registry("generator")
    if name is not None:
        return name, ctx.plugins.get("generator", name, key="task.generator").factory()
    claims = sorted(n for n, reg in registry.items()
                    if n != DEFAULT_GENERATOR and getattr(reg.factory, "accepts", lambda _: False)(model))
    if len(claims) > 1:
        raise ConfigError(f"task.generator: the generators {', '.join(map(repr, claims))} all take this model; "
                          "name the one to serve with")
    chosen = claims[0] if claims else DEFAULT_GENERATOR
    return chosen, ctx.plugins.get("generator", chosen, key="task.generator").factory()


class TextToImage:
    """The core's generator: one image of a prompt exactly as the ``sample`` task makes it with
    ``batch_size = 1`` (its seed's noise, a generator seeded by it, the same plan); the job's
    ``[[conditioners]]`` inputs and an ``init_image`` (img2img) may be uploaded. The PNG carries
    the ``sample`` task's metadata, so ``t2i-engine run --from-png`` re-makes it."""

    Request = GenerationRequest

    @staticmethod
    def accepts(model: Any) -> bool:
        return True

    def setup(self, resident: Resident) -> None:
        self.resident = resident

    def uploads(self, config: Any) -> list[Upload]:
        fields = [Upload(field, f"conditioners[{i}] {config.conditioners[i].name}: {name}")
                  for field, (i, name) in upload_fields(config).items()]
        return [*fields, Upload(INIT_IMAGE, "img2img source image (optional)")]

    def defaults(self, config: Any) -> dict[str, Any]:
        return {"strength": attrs.fields(GenerationRequest).strength.default}

    def prepare(self, draft: Draft) -> tuple[Any, dict[str, Any]]:
        from t2i_engine.config.schema import ComponentConfig
        from t2i_engine.tasks.sample import SampleConfig

        request = draft.request
        try:
            options = SampleConfig(prompts=[request.prompt], negative_prompt=draft.negative_prompt,
                                   width=draft.width, height=draft.height, seeds=[draft.seed],
                                   init_image=draft.inputs.get(INIT_IMAGE), strength=request.strength)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"request: {exc}") from exc
        plugin = self.resident.ctx.plugins.get("task", "sample").plugin
        task = ComponentConfig(kind="task", name="sample", options=options, plugin=plugin)
        params = {"width": draft.width, "height": draft.height,
                  **({"strength": request.strength} if INIT_IMAGE in draft.inputs else {})}
        return attrs.evolve(draft.config, task=task), params

    def generate(self, ctx: RunContext, sampler: Sampler,
                 progress: Callable[[int], StepCallback]) -> tuple[Any, dict[str, str]]:
        from t2i_engine.conditioning.inputs import load_image
        from t2i_engine.diffusion.guidance import GuidanceConfig
        from t2i_engine.pipeline import sampling_sigmas_for
        from t2i_engine.tasks.sample import image_metadata, sample_batch, steps_run
        from t2i_engine.utils.images import to_pil

        r, c = self.resident, ctx.config.task.options
        sigmas = sampling_sigmas_for(sampler, r.model.schedule)
        callback = progress(steps_run(sigmas, img2img=c.init_image is not None, strength=c.strength))
        init = None if c.init_image is None else \
            load_image(c.init_image, width=c.width, height=c.height, key=INIT_IMAGE).to(r.dtype)
        seed = c.seeds[0]
        images = sample_batch(r.model, list(c.prompts), [seed], config=c, sampler=sampler, sigmas=sigmas,
                              guidance=ctx.config.guidance or GuidanceConfig(), device=ctx.device, dtype=r.dtype,
                              autocast=r.autocast, init=init, conditioners=r.conditioners, callback=callback)
        pil = to_pil(images)[0]
        metadata = image_metadata(ctx, r.model, prompt=c.prompts[0], seed=seed, size=pil.size,
                                  steps=len(sigmas) - 1, batch_prompts=list(c.prompts), batch_seeds=[seed])
        return pil, metadata
