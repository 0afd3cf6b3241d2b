"""Stable Diffusion 1.5 on a CUDA GPU: the engine against diffusers (SDPA) and diffusers + torch.compile.

Both sides load one diffusers folder (the real ``sd-1`` architecture, random weights), so they run
the same weights on the same inputs:

* ``generate``: float16 weights (the engine's ``16-true``), 512x512, batch 1, classifier-free
  guidance 7.5, DPM++ 2M (diffusers' ``DPMSolverMultistepScheduler``), 50 steps, text encoding and
  VAE decoding included. Rows: the engine as it runs by default (PyTorch's ops: SDPA,
  ``F.group_norm``), the engine with its Triton kernels in the UNet (``T2I_KERNELS=triton`` while
  the UNet runs: the VAE's 512-wide attention heads are beyond the kernel), the engine with
  ``[task] compile = true`` (``compile_denoiser``: fullgraph, ``reduce-overhead``), diffusers, and
  diffusers with ``torch.compile(unet, mode="reduce-overhead", fullgraph=True)`` (its documented recipe).
  Reported as it/s (steps per second of the whole call) and the images' largest difference from
  diffusers'.
* ``train``: one UNet step (forward, MSE loss, backward, AdamW) at batch 8 on 64x64 latents under
  bf16 autocast with float32 weights: img/s and peak memory above the resident weights.

The implementations run round-robin, call by call, in one process (the order rotates each round),
and each row reports the median of its rounds.

    python benchmarks/sd_gpu.py                       # the issue-18 figures on one GPU
    python benchmarks/sd_gpu.py --only train --rounds 5
    python benchmarks/sd_gpu.py --device cpu --dtype float32 --preset tiny --size 64 --steps 3 \\
        --train-batch 2 --rounds 2 --no-compile        # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

PROMPT = "a photograph of an astronaut riding a horse"
Call = Callable[[], Any]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_backend(value: str | None) -> None:
    """Set ``T2I_KERNELS`` (read per call by the engine), or unset it for None."""
    if value is None:
        os.environ.pop("T2I_KERNELS", None)
    else:
        os.environ["T2I_KERNELS"] = value


def _kernels(backend: str | None, fn: Call) -> Call:
    """``fn`` with ``T2I_KERNELS`` set to ``backend`` for the call."""
    if backend is None:
        return fn

    def call() -> Any:
        old = os.environ.get("T2I_KERNELS")
        _set_backend(backend)
        try:
            return fn()
        finally:
            _set_backend(old)
    return call


def _kernels_in(module: torch.nn.Module, backend: str, fn: Call) -> Call:
    """``fn`` with ``T2I_KERNELS=backend`` only while ``module`` runs its forward."""
    def call() -> Any:
        outside = os.environ.get("T2I_KERNELS")
        hooks = [module.register_forward_pre_hook(lambda *_: _set_backend(backend)),
                 module.register_forward_hook(lambda *_: _set_backend(outside))]
        try:
            return fn()
        finally:
            for h in hooks:
                h.remove()
            _set_backend(outside)
    return call


def _engine_rows(make: Callable[[str], Call], device: torch.device) -> dict[str, Call]:
    """The engine as it runs by default and, on CUDA, with its Triton kernels forced; ``make(name)``
    builds one row's call."""
    rows = {"engine (default: PyTorch ops)": "auto"} | ({"engine (T2I_KERNELS=triton)": "triton"}
                                                       if device.type == "cuda" else {})
    return {name: _kernels(backend, make(name)) for name, backend in rows.items()}


def round_robin(calls: dict[str, Call], *, rounds: int, device: torch.device,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each entry over ``rounds`` rounds, one call of each per round; the
    order rotates round by round so that no side always runs first."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    _sync(device)
    names, times = list(calls), {name: [] for name in calls}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            start = time.perf_counter()
            calls[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


# --- generation ------------------------------------------------------------------------------


def generation_calls(folder: str, args: argparse.Namespace, device: torch.device,
                     dtype: torch.dtype) -> dict[str, Call]:
    """``name -> call``: each side's whole generation, returning its images in [-1, 1]."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from t2i_engine.diffusion.guidance import GuidanceConfig
    from t2i_engine.diffusion.registry import SAMPLERS, SamplerConfig
    from t2i_engine.pipeline import generate
    from t2i_engine.tasks.common import compile_denoiser, prepare_for_inference
    from t2i_plugin_sd.formats import DiffusersFolder
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    def load(*, compiled: bool = False) -> Any:
        model = build_model(DiffusersFolder().load(folder), PRESETS[args.preset]).to(device, dtype).eval()
        prepare_for_inference(model, pack=not compiled)  # what the sample task does after casting (16-true)
        if compiled:
            compile_denoiser(model, device)  # [task] compile = true: fullgraph, CUDA graphs
        return model

    noise = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))

    def engine(model: Any) -> Call:
        def call() -> torch.Tensor:
            sampler = SAMPLERS["dpmpp_2m"](SamplerConfig(steps=args.steps))
            with torch.inference_mode():
                return generate(model, [PROMPT], noise.to(device, dtype), sampler=sampler,
                                guidance=GuidanceConfig(guidance_scale=7.5))
        return call

    def pipeline() -> Any:
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(device)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                                 solver_order=2)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(pipe: Any) -> Call:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                out = pipe(PROMPT, latents=noise.to(device, dtype), num_inference_steps=args.steps,
                           guidance_scale=7.5, height=args.size, width=args.size, output_type="pt").images
            return out * 2 - 1  # [0, 1] -> the engine's [-1, 1]
        return call

    ours = load()
    calls = {"engine (default: PyTorch ops)": engine(ours)}
    if device.type == "cuda":  # the UNet's attention and GroupNorm only: the VAE's 512-wide heads are beyond the kernel
        calls["engine (T2I_KERNELS=triton in the UNet)"] = _kernels_in(ours.denoiser, "triton", engine(ours))
    calls["diffusers (SDPA)"] = run(pipeline())
    if args.compile:
        calls["engine + torch.compile ([task] compile)"] = engine(load(compiled=True))
        compiled = pipeline()
        compiled.unet = torch.compile(compiled.unet, mode="reduce-overhead", fullgraph=True)
        calls["diffusers + torch.compile"] = run(compiled)
    return calls


def report_generation(folder: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    calls = generation_calls(folder, args, device, dtype)
    reference = calls["diffusers (SDPA)"]()
    for name, fn in calls.items():  # also the warm-up (torch.compile compiles here)
        start = time.perf_counter()
        try:
            image = fn()
        except Exception as exc:  # noqa: BLE001 - a failing side is reported, the others still run
            print(f"  {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            calls[name] = None  # type: ignore[assignment]
            continue
        _sync(device)
        diff = (image.float() - reference.float()).abs().max().item()
        print(f"  {name}: first call {time.perf_counter() - start:.1f} s, max |image - diffusers'| {diff:.2e}",
              flush=True)
    calls = {k: v for k, v in calls.items() if v is not None}
    times = round_robin(calls, rounds=args.rounds, device=device, warmup=0)
    base = statistics.median(times["diffusers (SDPA)"])
    print(f"\n### Generation: {args.preset}, {dtype}, {args.size}x{args.size}, batch 1, CFG, DPM++ 2M "
          f"{args.steps} steps, median of {args.rounds} rounds\n")
    print("| implementation | s / image | it/s | time / diffusers' | per round (s) |\n|---|---:|---:|---:|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {args.steps / med:.1f} | {med / base:.2f}x | "
              + ", ".join(f"{t:.3f}" for t in ts) + " |", flush=True)


# --- training --------------------------------------------------------------------------------


def report_training(folder: str, args: argparse.Namespace, device: torch.device) -> None:
    from diffusers import UNet2DConditionModel

    from t2i_engine.interfaces import Conditioning, TextEmbedding
    from t2i_engine.training.config import TrainConfig
    from t2i_engine.training.optim import build_optimizer
    from t2i_plugin_sd.formats import DiffusersFolder
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    b, h = args.train_batch, args.size // 8
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(b, 4, h, h, generator=g).to(device), torch.randn(b, 4, h, h, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    context = torch.randn(b, 77, PRESETS[args.preset].unet.context_dim, generator=g).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.train_bf16 else nullcontext()
    peaks: dict[str, list[float]] = {}

    def step(name: str, module: torch.nn.Module, forward: Call) -> Call:
        opt = (build_optimizer(module.parameters(), TrainConfig(lr=1e-5)) if name.startswith("engine")
               else torch.optim.AdamW(module.parameters(), lr=1e-5))

        def call() -> None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            with amp:
                loss = torch.nn.functional.mse_loss(forward().float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                peaks.setdefault(name, []).append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
        return call

    ours = build_model(DiffusersFolder().load(folder), PRESETS[args.preset]).unet.to(device).train()
    theirs = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device).train()
    cond = Conditioning(text=TextEmbedding(context))
    calls = {**_engine_rows(lambda name: step(name, ours, lambda: ours(x, t, cond)), device),
             "diffusers (SDPA)": step("diffusers", theirs, lambda: theirs(x, t, encoder_hidden_states=context).sample)}
    times = round_robin(calls, rounds=args.rounds * 2, device=device, warmup=2)
    base = statistics.median(times["diffusers (SDPA)"])
    precision = "bf16 autocast, float32 weights" if args.train_bf16 else "float32"
    print(f"\n### Training step: {args.preset} UNet, batch {b}, {h}x{h} latents, {precision}, AdamW, "
          f"median of {args.rounds * 2} rounds\n")
    print("| implementation | s / step | img/s | time / diffusers' |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {b / med:.1f} | {med / base:.2f}x |", flush=True)
    if peaks:
        print("\npeak memory above the step's start (MiB, median): "
              + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in peaks.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="generation weights")
    p.add_argument("--preset", default="sd-1")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--no-train-bf16", dest="train_bf16", action="store_false")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--only", choices=("generate", "train"), default=None)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import diffusers

    print(f"{name}; torch {torch.__version__}; diffusers {diffusers.__version__}", flush=True)
    from t2i_plugin_sd.formats import DiffusersFolder
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    with tempfile.TemporaryDirectory(prefix="sd-gpu-") as tmp:
        folder = str(Path(tmp) / args.preset)
        DiffusersFolder().save(build_model(None, PRESETS[args.preset], seed=0), folder)
        if args.only in (None, "generate"):
            report_generation(folder, args, device, dtype)
        if args.only in (None, "train"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report_training(folder, args, device)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
