"""Stable Diffusion 1.5 components on the CPU, the engine against diffusers, alternated call by call.

Whole-process rounds (``benchmarks/sd_pipeline.py``) cannot tell 0.62x from 0.93x on machines
whose speed drifts 2x from day to day and 30% between processes. Here both sides live in one
process with identical weights (the real ``sd-1`` architecture, random weights, loaded from one
diffusers folder), the same inputs and thread count, and every measurement is a *pair*: the two
sides run back to back, in alternating order, so drift hits both halves of a pair alike. Each
component reports the median of the per-pair ratios ours/diffusers with a 95% bootstrap interval.

Components, each in float32 and under bf16 autocast (the engine prepared as its sample task
prepares it: oneDNN packing, autocast weights cast once):

* ``text``: CLIP text encoding of a batch of 2 prompts (cond and uncond);
* ``unet``: one UNet evaluation on the guidance batch (2 x 4 x h x w latents);
* ``decode``: the VAE decoder on 1 x 4 x h x w latents;
* ``train``: UNet forward + backward at batch 2 (float32 and bf16 autocast). The optimizer step is
  left out of the pairing: two SD-1.5 UNets with their gradients and AdamW states (27 GB) do not
  fit a 24 GiB machine in one process (``benchmarks/sd_pipeline.py`` times the whole step, one
  side per process).

    python benchmarks/sd_interleaved.py [--pairs 10] [--size 256] [--threads N] [--only unet,train]
    python benchmarks/sd_interleaved.py --quick        # 128 px, 10 pairs, fp32 + bf16: a few minutes
    python benchmarks/sd_interleaved.py --preset tiny --size 32 --pairs 3   # a seconds-long smoke run
    python benchmarks/sd_interleaved.py --quick --only unet --openvino      # + the UNet against OpenVINO

Each call is timed by the process's CPU time when torch runs one thread (a busy machine does not
inflate it by descheduling the process), by the wall clock otherwise; ``--clock`` overrides it.
The engine side runs the CPU paths this machine selected (``t2i_engine.kernels.cpu_paths``,
printed first). The allocator is one per process, so both sides run glibc's defaults (what a
diffusers user runs: every large temporary is page-faulted in afresh, about 27 ms for a 59 MB
gradient on the Zen 4 of docs/benchmarks.md), or with ``--retain-heap`` both keep freed memory in
the heap as the engine's ``generate()`` and train loop do on the CPU
(``t2i_engine.utils.cpu_memory.retain_freed_memory``): the first is a diffusers user's allocator
given to both sides, the second the engine's. ``benchmarks/sd_pipeline.py`` runs each side in its
own process with its own allocator, as users run them.

``--openvino`` (``pip install openvino``, an optional benchmark dependency) adds a row per
precision: the engine's UNet against the same diffusers UNet converted with
``openvino.convert_model`` and compiled for the CPU (inference precision f32, or bf16 for the
bf16 rows), same inputs and thread count.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import median_interval  # noqa: E402
from sd_pipeline import _resident  # noqa: E402

from t2i_engine.kernels import cpu_paths  # noqa: E402
from t2i_engine.kernels.cpu_paths import cpu_description, default_clock, paired_ratios  # noqa: E402
from t2i_engine.utils.cpu_memory import retain_freed_memory  # noqa: E402

Call = Callable[[], Any]


def _autocast(precision: str) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# --- the two sides ---------------------------------------------------------------------------


def _models(folder: str, preset: str, precision: str) -> tuple[Any, Any]:
    from diffusers import StableDiffusionPipeline

    from t2i_engine.tasks.common import prepare_for_inference
    from t2i_plugin_sd.formats import DiffusersFolder
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    ours = build_model(DiffusersFolder().load(folder), PRESETS[preset])
    prepare_for_inference(ours, autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    _resident(ours, pipe.unet, pipe.vae, pipe.text_encoder)
    return ours, pipe


def inference_components(ours: Any, pipe: Any, *, size: int, precision: str) -> dict[str, tuple[Call, Call]]:
    """``name -> (ours, diffusers)`` zero-argument calls on identical inputs."""
    from t2i_engine.interfaces import Conditioning, TextEmbedding

    g, h = torch.Generator().manual_seed(0), size // 8
    prompts = ["a photograph of an astronaut riding a horse", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    x = torch.randn(2, 4, h, h, generator=g)  # the guidance batch
    t = torch.tensor([500.0, 500.0])
    with torch.inference_mode(), _autocast(precision):
        emb = ours.text_encoder.encode(prompts)
    ctx = emb.tokens.float()  # (2, 77, D): the same context for both UNets
    cond = Conditioning(text=TextEmbedding(ctx, emb.mask, emb.pooled))
    z = torch.randn(1, 4, h, h, generator=g)

    def run(fn: Call) -> Call:
        def call() -> Any:
            with torch.inference_mode(), _autocast(precision):
                return fn()
        return call

    sf = pipe.vae.config.scaling_factor
    return {
        "text": (run(lambda: ours.text_encoder.encode(prompts)), run(lambda: pipe.text_encoder(ids))),
        "unet": (run(lambda: ours.denoiser(x, t, cond)), run(lambda: pipe.unet(x, t, encoder_hidden_states=ctx))),
        "decode": (run(lambda: ours.autoencoder.decode(z)), run(lambda: pipe.vae.decode(z / sf))),
    }


def train_component(folder: str, preset: str, *, size: int, precision: str) -> tuple[Call, Call]:
    """One UNet forward + backward each, same inputs (gradients are dropped after each call)."""
    from diffusers import UNet2DConditionModel

    from t2i_engine.interfaces import Conditioning, TextEmbedding
    from t2i_plugin_sd.formats import DiffusersFolder
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    ours = build_model(DiffusersFolder().load(folder), PRESETS[preset]).unet.train()
    theirs = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").train()
    _resident(ours, theirs)
    g, h = torch.Generator().manual_seed(0), size // 8
    x, target = torch.randn(2, 4, h, h, generator=g), torch.randn(2, 4, h, h, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    context = torch.randn(2, 77, PRESETS[preset].unet.context_dim, generator=g)
    cond = Conditioning(text=TextEmbedding(context))

    def step(forward: Call, module: torch.nn.Module) -> Call:
        def call() -> None:
            with _autocast(precision):
                loss = torch.nn.functional.mse_loss(forward().float(), target)
            loss.backward()
            module.zero_grad(set_to_none=True)
        return call

    return (step(lambda: ours(x, t, cond), ours),
            step(lambda: theirs(x, t, encoder_hidden_states=context).sample, theirs))


def openvino_unet(ours: Any, pipe: Any, *, size: int, precision: str, threads: int) -> tuple[Call, Call]:
    """``(ours, OpenVINO)`` calls of one UNet evaluation on the guidance batch: diffusers' UNet
    converted by ``openvino.convert_model`` (the same weights) and compiled for the CPU."""
    import openvino as ov

    from t2i_engine.interfaces import Conditioning, TextEmbedding

    g, h = torch.Generator().manual_seed(0), size // 8
    x, t = torch.randn(2, 4, h, h, generator=g), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)

    class Plain(torch.nn.Module):  # the UNet's output tensor, not diffusers' output dataclass
        def __init__(self, unet: torch.nn.Module) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            return self.unet(x, t, encoder_hidden_states=ctx).sample

    with torch.no_grad():
        model = ov.convert_model(Plain(pipe.unet).eval(), example_input=(x, t, ctx))
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    inputs = [x.numpy(), t.numpy(), ctx.numpy()]
    cond = Conditioning(text=TextEmbedding(ctx))

    def mine() -> Any:
        with torch.inference_mode(), _autocast(precision):
            return ours.denoiser(x, t, cond)

    return mine, lambda: request.infer(inputs)


# --- driver ----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=10, help="timed pairs per component (after one warm-up pair)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size / 8)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--only", default="text,unet,decode,train", help="comma-separated components")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--preset", default="sd-1", help="SD plugin preset (tiny: a smoke run)")
    p.add_argument("--quick", action="store_true", help="128 px, 10 pairs: a few minutes")
    p.add_argument("--folder", default=None, help="reuse a diffusers folder written by an earlier run")
    p.add_argument("--openvino", action="store_true", help="also pair the UNet against OpenVINO's")
    p.add_argument("--retain-heap", action="store_true",
                   help="keep freed memory in glibc's heap for both sides (the engine's own setting on the CPU)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="timer of each call: process CPU time (immune to being descheduled on a busy machine), "
                        "wall time, or auto: CPU time with one thread, wall time with more")
    args = p.parse_args()
    if args.quick:
        args.size, args.pairs = 128, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = args.only.split(",")
    tmp = None
    folder = args.folder
    if folder is None:
        from t2i_plugin_sd.formats import DiffusersFolder
        from t2i_plugin_sd.model import build_model
        from t2i_plugin_sd.presets import PRESETS

        tmp = tempfile.TemporaryDirectory(prefix="sd-interleaved-")
        folder = str(Path(tmp.name) / args.preset)
        DiffusersFolder().save(build_model(None, PRESETS[args.preset], seed=0), folder)
    if args.retain_heap:  # both sides share this process, so both get the setting, or neither
        retain_freed_memory()
    clock = {"cpu": time.process_time, "wall": time.perf_counter, "auto": default_clock()}[args.clock]
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{args.preset} at {args.size}x{args.size}; {args.pairs} pairs per row; clock {clock.__name__}", flush=True)
    choices = cpu_paths.select()  # what the sample task settles before it runs (cached per machine)
    print("CPU paths on this machine (fast/PyTorch time, kept):",
          ", ".join(f"{c.path} {c.ratio}{'' if c.enabled else ' off'}" for c in choices.values()), flush=True)
    rows = []
    for precision in args.precisions.split(","):
        def measure(components: dict[str, tuple[Call, Call]]) -> None:
            for name, (mine, theirs) in components.items():
                ratios = paired_ratios(mine, theirs, pairs=args.pairs, clock=clock)
                rows.append((name, precision, *median_interval(ratios)))
                med, low, high = rows[-1][2:]
                print(f"  {name} {precision}: " + " ".join(f"{r:.2f}" for r in ratios) +
                      f"  -> median {med:.2f}x, 95% interval {low:.2f}-{high:.2f}", flush=True)  # kept if stopped later

        if set(wanted) & {"text", "unet", "decode"}:
            ours, pipe = _models(folder, args.preset, precision)
            measure({k: v for k, v in inference_components(ours, pipe, size=args.size, precision=precision).items()
                     if k in wanted})
            if args.openvino:
                measure({"unet vs OpenVINO": openvino_unet(ours, pipe, size=args.size, precision=precision,
                                                           threads=args.threads)})
            del ours, pipe  # free them before the training models
        if "train" in wanted:
            measure({"train": train_component(folder, args.preset, size=args.size, precision=precision)})
    print("\n| component | precision | ours / reference (median) | 95% interval |\n|---|---|---|---|")
    for name, precision, med, low, high in rows:
        print(f"| {name} | {precision} | {med:.2f}x | {low:.2f}-{high:.2f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
