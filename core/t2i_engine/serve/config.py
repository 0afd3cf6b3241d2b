"""``[task] name = "serve"``: the server's own keys, and one generation request's keys.

The job names the model, ``[[conditioners]]``, ``[[adapters]]``, ``[sampler]`` and ``[guidance]``
as a ``sample`` job does; those are the defaults every request starts from. A request's keys
(:class:`GenerationRequest`) are validated by the same code as a job file's, so a bad request
gets the message a bad job would (``request.width: must be between 8 and 16384 pixels: 4``).
"""

from __future__ import annotations

import attrs

from t2i_engine.config.fields import option
from t2i_engine.config.limits import image_side, seed_value

__all__ = ["GenerationRequest", "ServeConfig"]

_ge1 = attrs.validators.ge(1)


def _optional(*validators: object) -> object:
    return attrs.validators.optional(list(validators))  # type: ignore[arg-type]


def _port(_inst: object, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"'{attribute.name}' must be between 0 and 65535 (0: any free port): {value}")


@attrs.frozen
class ServeConfig:
    """``[task] name = "serve"``: an HTTP API and a web page over one resident model."""

    host: str = option(default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    port: int = option(default=7860, validator=_port, help="TCP port (0: any free port, printed at start)")
    queue_size: int = option(default=16, validator=_ge1,
                             help="requests waiting behind the running one; more are refused (HTTP 429)")
    token_env: str | None = option(default=None, help="name of an environment variable holding a bearer token "
                                   "every API call must send (Authorization: Bearer ...); unset: no token")
    width: int = option(default=512, validator=image_side, help="default image width of a request")
    height: int = option(default=512, validator=image_side, help="default image height of a request")
    negative_prompt: str = option(default="", help="default negative prompt of a request")
    max_side: int = option(default=1024, validator=image_side, help="largest width or height a request may ask for")
    max_steps: int = option(default=150, validator=_ge1, help="most sampler steps a request may ask for")
    max_upload_bytes: int = option(default=8 * 2**20, validator=_ge1,
                                   help="largest request body in bytes (uploads included); larger: HTTP 413")
    preview_every: int = option(default=4, validator=attrs.validators.ge(0),
                                help="send an x0 preview every this many steps (0: none)")
    preview_size: int = option(default=128, validator=[attrs.validators.ge(16), attrs.validators.le(512)],
                               help="longest side of a preview image in pixels")
    history: int = option(default=200, validator=_ge1,
                          help="finished generations the gallery lists (older ones stay on disk only)")
    generator: str | None = option(default=None, help="the registered generator that makes the images "
                                   "(text-to-image, edit ...); unset: the one made for the model (an "
                                   "InstructPix2Pix UNet: edit), else text-to-image")


@attrs.frozen
class GenerationRequest:
    """One generation: ``POST /api/generations``; keys left out take the job's values."""

    prompt: str = option(help="the prompt")
    negative_prompt: str | None = option(default=None, help="default: task.negative_prompt")
    width: int | None = option(default=None, validator=_optional(image_side), help="default: task.width")
    height: int | None = option(default=None, validator=_optional(image_side), help="default: task.height")
    steps: int | None = option(default=None, validator=_optional(_ge1), help="default: sampler.steps")
    sampler: str | None = option(default=None, help="a registered sampler; default: sampler.name")
    guidance_scale: float | None = option(default=None, validator=_optional(attrs.validators.ge(0.0)),
                                          help="default: guidance.guidance_scale")
    seed: int | None = option(default=None, validator=_optional(seed_value), help="default: a random seed")
    strength: float = option(default=0.8, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)],
                             help="img2img (an init_image upload): fraction of the steps run")

