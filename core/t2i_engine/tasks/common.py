"""Helpers shared by the core's model tasks (``sample``, ``train``, ``precache``)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

from t2i_engine.adapters.config import apply_adapters
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import LatentDiffusionModel, RunContext, missing_members
from t2i_engine.kernels import cpu_paths
from t2i_engine.nn.cpu_inference import channels_last_bf16, pack_weights
from t2i_engine.nn.precision import cast_autocast_weights

__all__ = ["apply_schedule", "build_model", "compile_denoiser", "inference_precision", "output_path", "prepare_for_autocast", "prepare_for_inference"]


def build_model(ctx: RunContext, *, task: str) -> LatentDiffusionModel:
    """The ``[model]`` of the run, moved to the run's device, with the run's ``[schedule]`` and
    ``[[adapters]]`` applied; a ConfigError when the table is missing or its type does not
    implement :class:`~t2i_engine.interfaces.LatentDiffusionModel`.

    Adapters stay separate layers for inference; ``train`` bakes them into the weights first, so
    it fine-tunes (and exports) the adapted model.
    """
    if ctx.config.model is None:
        raise ConfigError(f"model: task '{task}' needs a [model] table (e.g. type = \"stable-diffusion\")")
    model = ctx.plugins.build(ctx.config.model)
    missing = missing_members(model, LatentDiffusionModel)
    if missing:
        raise ConfigError(f"model.type: '{ctx.config.model.name}' (from plugin '{ctx.config.model.plugin}') "
                          f"does not implement LatentDiffusionModel, which task '{task}' drives: it lacks "
                          f"{', '.join(missing)} (see docs/contracts.md)")
    apply_schedule(ctx, model)
    model = model.to(ctx.device)
    for adapter, _ in apply_adapters(model, ctx.config.adapters):  # type: ignore[arg-type]
        if task == "train":
            adapter.bake()
    return model


def apply_schedule(ctx: RunContext, model: LatentDiffusionModel) -> None:
    """Replace ``model``'s noise schedule by the run's ``[schedule]`` table, when it has one.

    The table is the whole schedule: betas, timesteps, zero-SNR rescale and the timestep spacing
    every sampler then uses (keys it does not give take the schedule type's defaults; a diffusers
    folder's scheduler config no longer applies). A ConfigError when the kinds differ (a discrete
    model given a continuous schedule or the reverse) or the model's schedule cannot be replaced.
    Every task that builds its model with :func:`build_model` gets this.
    """
    if ctx.config.schedule is None:
        return
    schedule = ctx.plugins.build(ctx.config.schedule)
    ours, theirs = bool(getattr(model.schedule, "discrete", False)), bool(getattr(schedule, "discrete", False))
    if ours != theirs:
        kind = {True: "discrete (DDPM timesteps)", False: "continuous"}
        raise ConfigError(f"schedule.type: '{ctx.config.schedule.name}' is a {kind[theirs]} schedule but model "
                          f"'{ctx.config.model.name}' was trained on a {kind[ours]} one")  # type: ignore[union-attr]
    try:
        model.schedule = schedule  # type: ignore[misc]
    except AttributeError as e:
        raise ConfigError(f"schedule: model '{ctx.config.model.name}' does not let [schedule] replace its "  # type: ignore[union-attr]
                          f"noise schedule ({e})") from e


def output_path(ctx: RunContext, path: str) -> str:
    """``path`` as given when absolute or a URL, else inside ``engine.output_dir``."""
    if "://" in path or Path(path).expanduser().is_absolute():
        return str(Path(path).expanduser()) if "://" not in path else path
    return str(Path(ctx.output_dir) / path)


def prepare_for_autocast(model: LatentDiffusionModel, dtype: torch.dtype) -> int:
    """Cast the weights autocast would cast on every call, in each of ``model``'s components, to
    ``dtype`` once (:func:`t2i_engine.nn.precision.cast_autocast_weights`); the number cast.

    For a model that runs only under ``torch.autocast(dtype=dtype)`` from then on.
    """
    return sum(cast_autocast_weights(part, dtype) for part in (model.text_encoder, model.autoencoder, model.denoiser)
               if isinstance(part, torch.nn.Module))


def prepare_for_inference(model: LatentDiffusionModel, *, autocast_dtype: torch.dtype | None = None,
                          pack: bool = True) -> None:
    """Get a model the task owns ready for inference only (it is changed in place).

    With ``autocast_dtype`` (a ``*-mixed`` precision other than 32) the autocast layers' weights
    are cast once (:func:`prepare_for_autocast`); on the CPU this machine's fast paths are settled
    (:func:`t2i_engine.kernels.cpu_paths.select`: cached per machine, timed on first use) and the
    denoiser's deep convolutions and linears packed into oneDNN's layout where that pays
    (:func:`t2i_engine.nn.cpu_inference.pack_weights`), unless ``pack`` is False (a denoiser
    that ``torch.compile`` will trace: Inductor lays out its own weights). A CPU autoencoder whose
    convolutions run in bf16 is put in ``channels_last`` where that pays on this machine
    (:func:`t2i_engine.nn.cpu_inference.channels_last_bf16`).
    """
    if autocast_dtype is not None and autocast_dtype != torch.float32:
        prepare_for_autocast(model, autocast_dtype)
    if _on_cpu(model.denoiser) or _on_cpu(model.autoencoder):
        cpu_paths.select()  # this machine's fast paths: cached, timed on the first run here
    if isinstance(model.denoiser, torch.nn.Module):
        if _on_cpu(model.denoiser):
            warn_slow_cpu_bf16(model.denoiser, autocast_dtype)
        if pack:
            pack_weights(model.denoiser)  # CPU layers only: it skips the others
    if _on_cpu(model.autoencoder):
        channels_last_bf16(model.autoencoder)  # bf16 CPU convolutions only: it skips the others


def _on_cpu(part: object) -> bool:
    """Whether ``part`` is a module with parameters on the CPU."""
    return isinstance(part, torch.nn.Module) and any(p.device.type == "cpu" for p in part.parameters())


def compile_denoiser(model: LatentDiffusionModel, device: torch.device) -> str:
    """``torch.compile`` the denoiser network in place (``nn.Module.compile``: its weights and
    state_dict keys stay as they are) with ``fullgraph=True``; returns the mode used.

    On CUDA the mode is ``reduce-overhead`` (CUDA graphs: a UNet step launches hundreds of small
    kernels, and without graphs the host's launch time, not the GPU, sets the pace), which is
    diffusers' documented recipe; elsewhere Inductor's ``default``. The first call at each new
    shape compiles (a minute or so for SD-1.5); later calls reuse the graph. Call it after
    :func:`prepare_for_inference` with ``pack=False``. On the CPU it warns: SD-1.5 at 128 px took
    1.76x the plain engine's time compiled, 1.9x with Inductor's freezing (docs/benchmarks.md).
    """
    if not isinstance(model.denoiser, torch.nn.Module):
        raise ConfigError(f"task.compile: the denoiser ({type(model.denoiser).__name__}) is not an nn.Module")
    if device.type == "cpu":
        warnings.warn("task.compile on the CPU: Inductor's graph ran SD-1.5 about 1.8x slower than the engine's "
                      "own CPU paths (packed oneDNN weights), which compiling turns off; set compile = false "
                      "unless it measures faster here (docs/stable-diffusion.md)", stacklevel=3)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    model.denoiser.compile(fullgraph=True, mode=mode)
    return mode


def warn_slow_cpu_bf16(denoiser: torch.nn.Module, autocast_dtype: torch.dtype | None) -> None:
    """Warn when a CPU denoiser runs in bf16 where oneDNN has no bf16 convolution (it needs
    AVX-512 BW/VL/DQ or AVX-NE-CONVERT): PyTorch then takes its generic im2col convolution, and
    the SD-1.5 UNet ran about 20x slower than in float32 (AVX2 AMD EPYC, docs/benchmarks.md)."""
    bf16 = autocast_dtype == torch.bfloat16 or any(p.dtype == torch.bfloat16 for p in denoiser.parameters())
    reason = cpu_paths.unsupported_reason("conv_pack_bf16") if bf16 else None
    if reason is not None:
        warnings.warn(f"bf16 on this CPU runs convolutions through PyTorch's generic path, many times slower "
                      f"than float32 (oneDNN: {reason}); set [engine] precision = \"32-true\" for speed",
                      stacklevel=3)


def inference_precision(ctx: RunContext, model: LatentDiffusionModel, *,
                        compile: bool = False) -> tuple[Any, torch.dtype]:
    """``(context manager, noise dtype)`` for ``engine.precision`` when running ``model``.

    ``*-mixed`` runs under ``torch.autocast`` on the run's device, with the weights autocast casts
    on every call (linear and convolution layers) cast once here instead
    (:func:`t2i_engine.nn.precision.cast_autocast_weights`: the same arithmetic, no per-step casts,
    half the weight memory); ``*-true`` casts the model's weights (``model.to(dtype)``) and the
    noise; ``32-true`` changes no dtype. Then :func:`prepare_for_inference` (on the CPU, deep
    convolutions are packed), or with ``compile`` no packing and :func:`compile_denoiser`. The
    model must be the task's own (it is changed in place).
    """
    precision = ctx.config.engine.precision
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 \
        if precision.startswith("16") else torch.float32
    if precision.endswith("-mixed"):
        prepare_for_inference(model, autocast_dtype=dtype, pack=not compile)
        autocast: Any = torch.autocast(ctx.device.type, dtype=dtype)
        dtype = torch.float32
    else:
        if dtype != torch.float32:
            model.to(dtype)  # type: ignore[call-arg]
        prepare_for_inference(model, pack=not compile)
        autocast = contextlib.nullcontext()
    if compile:
        compile_denoiser(model, ctx.device)
    return autocast, dtype
