"""``edit``: the serve generator of InstructPix2Pix (``t2i-engine serve`` of an 8-channel editor).

Registered through ``register_generators``; the server picks it for a model whose UNet takes 8
input channels (``accepts``), or when the serve job says ``[task] generator = "edit"``. A request
uploads the source image as the multipart field ``source`` (required) and may set
``image_guidance_scale`` (s_I; default ``[guidance] image_guidance_scale``, else 1.5) beside the
core keys; ``guidance_scale`` is s_T. The image has the source's size (floored to the
autoencoder's factor), so ``width``, ``height`` and ``strength`` are not request keys here.

Each generation is an ``edit`` job of one source (the stored upload) made exactly as the ``edit``
task makes it (:func:`~t2i_plugin_instructpix2pix.task.edit_one`, EMA weights when the file has
them, as the task's default); its PNG records the instruction, seed, source, sampler, steps, both
scales and that job (``t2i_engine_job``), so ``t2i-engine run --from-png`` re-makes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from t2i_engine.config.fields import option
from t2i_engine.errors import ConfigError
from t2i_engine.serve.config import GenerationRequest
from t2i_engine.serve.generators import Draft, Resident, Upload

__all__ = ["SOURCE", "EditGenerator", "EditRequest"]

SOURCE = "source"
"""The upload field of the image to edit."""

_core = attrs.fields(GenerationRequest)  # the core keys' validators, reused


@attrs.frozen
class EditRequest:
    """One served edit (``POST /api/generations`` with the ``source`` upload)."""

    prompt: str = option(help="the edit instruction")
    negative_prompt: str | None = option(default=None, help="text of the two text-free branches; "
                                                            "default: task.negative_prompt")
    steps: int | None = option(default=None, validator=_core.steps.validator, help="default: sampler.steps")
    sampler: str | None = option(default=None, help="a registered sampler; default: sampler.name")
    guidance_scale: float | None = option(default=None, validator=_core.guidance_scale.validator,
                                          help="s_T, the text guidance; default: guidance.guidance_scale")
    image_guidance_scale: float | None = option(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0.0)),
        help="s_I, the source-image guidance; default: guidance.image_guidance_scale, else 1.5")
    seed: int | None = option(default=None, validator=_core.seed.validator, help="default: a random seed")


def _image_scale(guidance: Any) -> float:
    from t2i_plugin_instructpix2pix.task import IMAGE_GUIDANCE_DEFAULT

    value = getattr(guidance, "image_guidance_scale", None)
    return IMAGE_GUIDANCE_DEFAULT if value is None else float(value)


class EditGenerator:
    """Edits of an uploaded source image by an instruction (see the module docstring)."""

    Request = EditRequest

    @staticmethod
    def accepts(model: Any) -> bool:
        from t2i_plugin_instructpix2pix.edit import EDIT_CHANNELS

        config = getattr(getattr(model, "denoiser", None), "config", None)
        return getattr(config, "in_channels", None) == EDIT_CHANNELS

    def setup(self, resident: Resident) -> None:
        from t2i_plugin_instructpix2pix.task import edit_scales, settle_model

        ctx = resident.ctx
        if ctx.config.conditioners:
            raise ConfigError("conditioners: the 'edit' generator (InstructPix2Pix) applies no [[conditioners]]; "
                              "remove them from the serve job")
        settle_model(ctx, resident.model, ema=True)  # the edit task's default: the reference's EMA weights
        edit_scales(ctx)  # guidance keys InstructPix2Pix does not apply: refused at start
        self.resident = resident

    def uploads(self, config: Any) -> list[Upload]:
        return [Upload(SOURCE, "source image to edit (required; the edit has its size)", required=True)]

    def defaults(self, config: Any) -> dict[str, Any]:
        return {"image_guidance_scale": _image_scale(config.guidance)}

    def prepare(self, draft: Draft) -> tuple[Any, dict[str, Any]]:
        from PIL import Image

        from t2i_engine.config.schema import ComponentConfig
        from t2i_engine.diffusion.guidance import GuidanceConfig
        from t2i_plugin_instructpix2pix.task import EditConfig

        r, request, source = self.resident, draft.request, draft.inputs[SOURCE]
        with Image.open(source) as image:  # the stored upload: decoded and checked by the server
            width, height = image.size
        f = int(r.model.autoencoder.downsample_factor)
        if width < f or height < f or max(width, height) > draft.max_side:
            raise ConfigError(f"{SOURCE}: {width}x{height} pixels; the edit has the source's size, so each side must "
                              f"be between {f} and {draft.max_side} pixels (task.max_side)")
        guidance = draft.config.guidance or GuidanceConfig()
        s_i = _image_scale(guidance) if request.image_guidance_scale is None else request.image_guidance_scale
        guidance = attrs.evolve(guidance, image_guidance_scale=s_i)
        options = EditConfig(sources=[source], prompts=[request.prompt], negative_prompt=draft.negative_prompt,
                             seeds=[draft.seed])
        task = ComponentConfig(kind="task", name="edit", options=options,
                               plugin=r.ctx.plugins.get("task", "edit").plugin)
        shown = {"width": width // f * f, "height": height // f * f, "image_guidance_scale": s_i}
        return attrs.evolve(draft.config, task=task, guidance=guidance), shown

    def generate(self, ctx: Any, sampler: Any, progress: Callable[[int], Any]) -> tuple[Any, dict[str, str]]:
        from t2i_engine.config.render import render_toml
        from t2i_engine.pipeline import sampling_sigmas_for
        from t2i_engine.tasks.sample import steps_run
        from t2i_engine.utils.images import to_pil
        from t2i_engine.utils.recipe import JOB_CHUNK
        from t2i_plugin_instructpix2pix.edit import load_source
        from t2i_plugin_instructpix2pix.task import edit_metadata, edit_one, edit_scales

        r, c = self.resident, ctx.config.task.options
        s_t, s_i = edit_scales(ctx)
        prompt, seed, url = c.prompts[0], c.seeds[0], c.sources[0]
        source = load_source(url, factor=r.model.autoencoder.downsample_factor, key=SOURCE).to(r.dtype)
        steps = steps_run(sampling_sigmas_for(sampler, r.model.schedule), img2img=False, strength=1.0)
        image = edit_one(ctx, r.model, source, prompt, seed, sampler=sampler, scales=(s_t, s_i),
                         negative_prompt=c.negative_prompt, dtype=r.dtype, autocast=r.autocast,
                         callback=progress(steps))
        metadata = {"prompt": prompt, "seed": str(seed), "source": url,
                    **edit_metadata(ctx, negative_prompt=c.negative_prompt, scales=(s_t, s_i)), "steps": str(steps),
                    "model": str(getattr(r.model, "description", None) or ctx.config.model.name),
                    JOB_CHUNK: render_toml(ctx.config)}
        return to_pil(image)[0], metadata
