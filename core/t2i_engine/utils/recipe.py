"""The recipe a sample PNG carries, and re-running a job from it (``t2i-engine run --from-png``).

Each PNG the ``sample`` task writes holds, beside the engine's own text chunks (``prompt``,
``seed``, ``sampler`` ...):

* ``parameters``: A1111's infotext (:mod:`t2i_engine.utils.infotext`), for PNG Info, Civitai and
  the many tools that read it;
* ``t2i_engine_job``: the resolved job as TOML (every default filled in, paths absolute), narrowed
  to the sampler batch that made the image: the batch's prompts and seeds, so the re-run draws
  the same noise in the same batch and gives the same pixels. With ``batch_size = 1`` (the
  default) that is the image alone.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from t2i_engine.errors import ConfigError
from t2i_engine.utils.infotext import a1111_sampler_name, format_infotext, model_hash

__all__ = ["JOB_CHUNK", "PARAMETERS_CHUNK", "load_png_job", "sample_png_metadata"]

JOB_CHUNK = "t2i_engine_job"
"""The PNG text chunk holding the resolved job (TOML) that made the image."""

PARAMETERS_CHUNK = "parameters"
"""The PNG text chunk A1111 writes and its readers parse."""

_CHURN_KEYS = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}


def _checkpoint(ctx: Any) -> str | None:
    """The ``[model] checkpoint`` of the run (a resolved path or URL), when the model has one."""
    model = ctx.config.model
    return getattr(model.options, "checkpoint", None) if model is not None else None


def _model_name(ctx: Any, checkpoint: str | None) -> str:
    return str(ctx.config.model.name) if checkpoint is None else _stem(checkpoint)


def _stem(path: str) -> str:
    """A checkpoint or LoRA file's name without its weights suffix (what A1111 calls it)."""
    name = Path(str(path).rstrip("/")).name
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".nemo", ".bin"):
        name = name.removesuffix(suffix)
    return name


def _adapters_text(adapters: Sequence[Any]) -> tuple[str, str | None]:
    """A1111's spelling of the LoRAs a run applied: ``<lora:name:multiplier>`` tags (which its
    prompt carries) and the ``Lora hashes`` value (``"name: hash, ..."``)."""
    tags = " ".join(f"<lora:{_stem(a.path)}:{a.multiplier:g}>" for a in adapters)
    hashes = ", ".join(f"{_stem(a.path)}: {model_hash(a.path) or ''}" for a in adapters)
    return tags, hashes or None


def _sampler_params(sampler: Any, schedule: Any) -> dict[str, Any]:
    """Steps, A1111 sampler name, schedule type (Karras, else the discrete schedule's timestep
    spacing) and the sampler options A1111 has keys for."""
    opts = sampler.options
    karras = bool(getattr(opts, "karras", False))
    params: dict[str, Any] = {"Steps": getattr(opts, "steps", None),
                              "Sampler": a1111_sampler_name(sampler.name, karras=karras),
                              "Schedule type": "Karras" if karras else None,
                              "Timestep spacing": None if karras else getattr(schedule, "spacing", None)}
    if karras and getattr(opts, "rho", 7.0) != 7.0:
        params["Schedule rho"] = opts.rho
    eta = getattr(opts, "eta", None)
    if eta is not None and eta != (0.0 if sampler.name == "ddim" else 1.0):
        params["Eta DDIM" if sampler.name == "ddim" else "Eta"] = eta
    if getattr(opts, "s_churn", 0.0) > 0:
        params |= {label: getattr(opts, key) for key, label in _CHURN_KEYS.items()}
    elif getattr(opts, "s_noise", 1.0) != 1.0:
        params["Sigma noise"] = opts.s_noise
    return params


def _guidance_params(guidance: Any) -> dict[str, Any]:
    return {"CFG scale": guidance.guidance_scale,
            "CFG Rescale": guidance.guidance_rescale or None,
            "Dynamic threshold": guidance.dynamic_threshold,
            "Dynamic threshold max": guidance.dynamic_threshold_max,
            "Clip denoised": True if guidance.clip_denoised else None,
            "Guidance interval": _interval_text(guidance.guidance_interval)}


def _interval_text(interval: tuple[float, float] | None) -> str | None:
    """``(lo, hi)`` as ``"lo-hi"``: one infotext value (A1111 has no key for it)."""
    return None if interval is None else f"{interval[0]:g}-{interval[1]:g}"


def _component_text(component: Any) -> str:
    """``type: canny, scale: 0.8, ...``: a conditioner's name and its scalar options."""
    from t2i_engine.config.structure import unstructure

    options = unstructure(component.options) if component.options is not None else {}
    items = [f"type: {component.name}"] + [f"{k}: {v}" for k, v in options.items()
                                           if isinstance(v, str | int | float | bool)]
    return ", ".join(items)


def _job_toml(ctx: Any, batch_prompts: Sequence[str], batch_seeds: Sequence[int]) -> str:
    """The run's resolved config as TOML, its task narrowed to one sampler batch."""
    from t2i_engine.config.render import render_toml

    task = ctx.config.task
    options = attrs.evolve(task.options, prompts=list(batch_prompts), seeds=[int(s) for s in batch_seeds],
                           images_per_prompt=1)
    return render_toml(attrs.evolve(ctx.config, task=attrs.evolve(task, options=options)))


def sample_png_metadata(ctx: Any, model: Any, *, prompt: str, seed: int, size: tuple[int, int],
                        batch_prompts: Sequence[str], batch_seeds: Sequence[int]) -> dict[str, str]:
    """The ``parameters`` and ``t2i_engine_job`` chunks (plus ``checkpoint`` and ``model_hash``
    when the model has a checkpoint) for one image of the ``sample`` task.

    Args:
        ctx: the run's :class:`~t2i_engine.interfaces.RunContext`.
        model: the model bundle that sampled (its ``schedule`` gives the timestep spacing).
        prompt, seed: this image's prompt and seed.
        size: ``(width, height)`` of the image.
        batch_prompts, batch_seeds: the sampler batch the image was made in.
    """
    from t2i_engine import __version__
    from t2i_engine.diffusion.guidance import GuidanceConfig

    task = ctx.config.task.options
    checkpoint = _checkpoint(ctx)
    digest = model_hash(checkpoint) if checkpoint is not None else None
    params: dict[str, Any] = _sampler_params(ctx.config.sampler, model.schedule)
    params |= _guidance_params(ctx.config.guidance or GuidanceConfig())
    params |= {"Seed": seed, "Size": f"{size[0]}x{size[1]}", "Model hash": digest,
               "Model": _model_name(ctx, checkpoint)}
    if getattr(task, "init_image", None) is not None:
        params["Denoising strength"] = task.strength
    if ctx.config.engine.precision != "32-true":
        params["Precision"] = ctx.config.engine.precision
    for i, conditioner in enumerate(ctx.config.conditioners):
        params[f"Conditioner {i}"] = _component_text(conditioner)
    lora_tags, params["Lora hashes"] = _adapters_text(ctx.config.adapters)
    params["Version"] = f"t2i-engine {__version__}"
    shown = f"{prompt} {lora_tags}" if lora_tags else prompt
    chunks = {PARAMETERS_CHUNK: format_infotext(shown, params, negative_prompt=getattr(task, "negative_prompt", "")),
              JOB_CHUNK: _job_toml(ctx, batch_prompts, batch_seeds)}
    if checkpoint is not None:
        chunks |= {"checkpoint": checkpoint, "model_hash": digest or ""}
    return chunks


def load_png_job(png: str | os.PathLike[str], pm: Any, *, overrides: Iterable[str] = ()) -> Any:
    """The job a sample PNG records (its ``t2i_engine_job`` chunk), validated like a config file.

    ``engine.output_dir`` becomes ``<png folder>/<png name>-rerun`` so the re-run never
    overwrites the image; ``overrides`` (``--set key=value``) apply after that, so they can
    change it, and anything else. A PNG without the chunk, or whose checkpoint or init image is
    gone, is a ConfigError naming the PNG or the key.
    """
    from PIL import Image, UnidentifiedImageError

    from t2i_engine.config.loader import apply_overrides, resolve_config

    path = Path(png)
    try:
        with Image.open(path) as image:
            text: Mapping[str, str] = getattr(image, "text", {})
            job = text.get(JOB_CHUNK)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"--from-png: no such file: '{path}'") from None
    except UnidentifiedImageError:
        raise ConfigError(f"--from-png: '{path}' is not an image") from None
    if job is None:
        raise ConfigError(f"--from-png: '{path}' has no '{JOB_CHUNK}' text chunk (only PNGs written by "
                          "t2i-engine's sample task record the job that made them)")
    try:
        data = tomllib.loads(job)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--from-png: the job recorded in '{path}' is not valid TOML: {exc}") from exc
    data.setdefault("engine", {})["output_dir"] = str(path.resolve().parent / f"{path.stem}-rerun")
    apply_overrides(data, overrides)
    return resolve_config(data, pm)
